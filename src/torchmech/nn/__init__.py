"""Ready models built on torchmech.de: NeuralODE, NeuralSDE, LatentSDE and NeuralCDE (all ``nn.Module``)."""

from torchmech.nn.cde import NeuralCDE
from torchmech.nn.latent import LatentSDE, LatentSDEOutput
from torchmech.nn.ode import NeuralODE
from torchmech.nn.sde import NeuralSDE

__all__ = ["NeuralODE", "NeuralSDE", "LatentSDE", "LatentSDEOutput", "NeuralCDE"]
