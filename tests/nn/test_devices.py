"""The ready models follow their inputs' device (runs only where CUDA is available)."""

import pytest
import torch

from torchmech.nn import LatentSDE, NeuralCDE, NeuralODE, NeuralSDE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_models_run_and_differentiate_on_cuda():
    dev = torch.device("cuda")
    t = torch.linspace(0, 1, 6, device=dev)
    y0 = torch.randn(4, 2, device=dev)
    for model, call in [
        (NeuralODE(state=2, hidden=8), lambda m: m(y0, t)),
        (NeuralODE(state=2, hidden=8, adjoint="backsolve"), lambda m: m(y0, t)),
        (NeuralSDE(2, hidden=8, dt=0.05), lambda m: m(y0, t, seed=0)),
        (NeuralSDE(2, hidden=8, sde_type="stratonovich", adjoint="reversible", dt=0.05), lambda m: m(y0, t, seed=0)),
        (LatentSDE(2, latent_dim=3, context_dim=4, hidden=8), lambda m: m.elbo(t, torch.randn(4, 6, 2, device=dev),
                                                                              seed=0)),
        (NeuralCDE(2, hidden=4, output=3, width=8), lambda m: m(torch.randn(4, 6, 2, device=dev))),
    ]:
        model = model.to(dev)
        out = call(model)
        assert out.device.type == "cuda"
        out.sum().backward()
        assert all(p.grad is None or p.grad.device.type == "cuda" for p in model.parameters())
    samples = LatentSDE(2, latent_dim=3, context_dim=4, hidden=8).to(dev).sample(t, 3, seed=0)
    assert samples.device.type == "cuda"


def test_device_mismatch_is_a_clear_error():
    model = NeuralODE(state=2, hidden=4)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="y0 is on cuda"):
            model(torch.randn(3, 2, device="cuda"), torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="y0 is on meta"):
        model(torch.empty(3, 2, device="meta"), torch.linspace(0, 1, 3))
