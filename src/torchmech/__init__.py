"""torchmech: learning differential equations from data in PyTorch."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("torchmech")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from torchmech import de, mnn, nn
from torchmech.de import SaveAt, cdeint, solve
from torchmech.mnn import MechanisticBlock, solve_linear_ode
from torchmech.nn import LatentSDE, NeuralCDE, NeuralODE, NeuralSDE
from torchmech.compat.torchsde import sdeint, sdeint_adjoint
from torchmech.compat.torchdiffeq import odeint, odeint_adjoint, odeint_event

__all__ = ["__version__", "de", "mnn", "nn", "solve", "SaveAt", "cdeint", "sdeint", "sdeint_adjoint", "odeint", "odeint_adjoint", "odeint_event", "solve_linear_ode", "MechanisticBlock",
           "NeuralODE", "NeuralSDE", "LatentSDE", "NeuralCDE"]
