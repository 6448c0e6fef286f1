"""NeuralSDE: shapes, noise types, Ito vs Stratonovich moments, adjoint gradients, clear errors."""

import math

import pytest
import torch

import torchmech.de as de
from torchmech.nn import NeuralSDE

DT = torch.float64


@pytest.mark.parametrize("noise", ["diagonal", "general", "scalar", "additive"])
def test_shapes_noise_types_and_seed(noise):
    model = NeuralSDE(3, hidden=8, depth=1, noise=noise, dt=0.05)
    y0 = torch.randn(4, 3)
    t = torch.linspace(0, 1, 6)
    a, b, c = model(y0, t, seed=3), model(y0, t, seed=3), model(y0, t, seed=4)
    assert a.shape == (4, 6, 3) and a.dtype == torch.float32
    torch.testing.assert_close(a[:, 0], y0)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    a.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_float64_per_sample_times_given_brownian_and_srk():
    model = NeuralSDE(2, hidden=8, noise="additive", solver="srk", dt=0.1).double()
    y0 = torch.randn(3, 2, dtype=DT)
    t = torch.linspace(0, 1, 5, dtype=DT) * torch.tensor([1.0, 2.0, 0.5], dtype=DT)[:, None]
    bm = de.BrownianInterval(0.0, 2.0, (3, 2), dtype=DT, seed=0, levy_area="space-time")
    out = model(y0, t, brownian=bm)
    assert out.shape == (3, 5, 2) and out.dtype == DT
    torch.testing.assert_close(model(y0, t, brownian=bm), out)  # the interval caches its path
    assert model(y0, t[:, :1]).shape == (3, 1, 2)


class Linear(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=DT))

    def forward(self, t, y):
        return self.c * y


@pytest.mark.parametrize("sde_type", ["ito", "stratonovich"])
def test_ito_and_stratonovich_geometric_brownian_motion(sde_type):
    """dy = mu y dt + sigma y dW: E y(1) = exp(mu) (Ito) and exp(mu + sigma^2/2) (Stratonovich)."""
    mu, sigma, n = 0.2, 0.8, 4000
    model = NeuralSDE(1, drift=Linear(mu), diffusion=Linear(sigma), sde_type=sde_type, dt=0.02)
    y1 = model(torch.ones(n, 1, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), seed=0)[:, -1, 0]
    expected = math.exp(mu + (0.0 if sde_type == "ito" else sigma ** 2 / 2))
    other = math.exp(mu + (sigma ** 2 / 2 if sde_type == "ito" else 0.0))
    # standard error of the mean is about 0.02; the two calculi differ by about 0.45
    assert abs(y1.mean().item() - expected) < 0.08
    assert abs(y1.mean().item() - other) > 0.3


@pytest.mark.parametrize("adjoint", ["reversible", "checkpoint"])
def test_adjoint_gradients_match_direct(adjoint):
    torch.manual_seed(2)
    kw = dict(state=3, hidden=8, depth=1, sde_type="stratonovich", solver="reversible_heun", dt=0.05)
    direct = NeuralSDE(**kw).double()
    other = NeuralSDE(**kw, adjoint=adjoint).double()
    other.load_state_dict(direct.state_dict())
    y0 = torch.randn(5, 3, dtype=DT)
    t = torch.tensor([0.0, 0.3, 0.45, 1.0], dtype=DT)
    grads = []
    for model in (direct, other):
        y = y0.clone().requires_grad_(True)
        bm = de.BrownianInterval(0.0, 1.0, (5, 3), dtype=DT, seed=7)
        loss = model(y, t, brownian=bm).pow(2).sum()
        grads.append(torch.autograd.grad(loss, [y, *model.parameters()]))
    for g_direct, g_other in zip(*grads):
        torch.testing.assert_close(g_other, g_direct, rtol=1e-8, atol=1e-10)
    if adjoint == "reversible":
        assert isinstance(other.adjoint, de.ReversibleAdjoint)
        assert isinstance(NeuralSDE(2, sde_type="stratonovich", adjoint="reversible").solver, de.ReversibleHeun)


def test_steps_land_on_output_times():
    model = NeuralSDE(2, hidden=4, dt=0.1)
    sol = model.solve(torch.randn(2, 2), torch.tensor([0.0, 0.25, 1.0]), seed=0)
    # [0, 0.25] -> 3 steps of 1/12, [0.25, 1] -> 8 steps of 0.09375
    assert bool((sol.stats["num_steps"] == 11).all())


def test_errors():
    with pytest.raises(ValueError, match="noise must be one of"):
        NeuralSDE(2, noise="colored")
    with pytest.raises(ValueError, match="brownian has dtype torch.float64 on cpu, the model's inputs torch.float32"):
        NeuralSDE(3)(torch.randn(2, 3), torch.linspace(0, 1, 5),
                     brownian=de.BrownianInterval(0.0, 1.0, shape=(2, 3), seed=0, dtype=torch.float64))
    with pytest.raises(ValueError, match="sde_type must be 'ito' or 'stratonovich'"):
        NeuralSDE(2, sde_type="ito2")
    with pytest.raises(ValueError, match="solves stratonovich SDEs but sde_type='ito'"):
        NeuralSDE(2, solver="heun")
    with pytest.raises(ValueError, match="Milstein solver needs noise='diagonal'"):
        NeuralSDE(2, noise="general", solver="milstein")
    with pytest.raises(ValueError, match="adjoint='reversible' needs solver='reversible_heun'"):
        NeuralSDE(2, solver="euler", adjoint="reversible")
    with pytest.raises(ValueError, match="diagonal noise has brownian_size = state = 2"):
        NeuralSDE(2, brownian_size=3)
    model = NeuralSDE(2, hidden=4)
    t = torch.linspace(0, 1, 3)
    with pytest.raises(ValueError, match=r"y0 must have shape \(batch, 2\), got \(3, 5\)"):
        model(torch.randn(3, 5), t)
    with pytest.raises(ValueError, match="t must be strictly increasing"):
        model(torch.randn(3, 2), torch.tensor([0.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"brownian.shape must be \(batch, brownian channels\) = \(3, 2\)"):
        model(torch.randn(3, 2), t, brownian=de.BrownianInterval(0.0, 1.0, (3, 1)))
    with pytest.raises(ValueError, match=r"brownian covers \[0.0, 0.5\]"):
        model(torch.randn(3, 2), t, brownian=de.BrownianInterval(0.0, 0.5, (3, 2)))
    with pytest.raises(ValueError, match="either brownian or seed"):
        model(torch.randn(3, 2), t, brownian=de.BrownianInterval(0.0, 1.0, (3, 2)), seed=1)


def test_backsolve_adjoint_converges_to_direct_gradients():
    """The stochastic adjoint is exact only as dt -> 0: its gradient error shrinks with the step."""
    errors = []
    for dt in (0.1, 0.025):
        torch.manual_seed(3)
        kw = dict(state=2, hidden=8, depth=1, sde_type="stratonovich", solver="heun", dt=dt)
        direct = NeuralSDE(**kw).double()
        back = NeuralSDE(**kw, adjoint="backsolve").double()
        back.load_state_dict(direct.state_dict())
        assert isinstance(back.adjoint, de.BacksolveAdjoint)
        y0 = torch.randn(4, 2, dtype=DT)
        t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
        grads = []
        for model in (direct, back):
            bm = de.BrownianInterval(0.0, 1.0, (4, 2), dtype=DT, seed=11)
            loss = model(y0, t, brownian=bm).pow(2).sum()
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
        errors.append(float((grads[1] - grads[0]).norm() / grads[0].norm()))
    assert errors[0] < 1e-2 and errors[1] < 0.5 * errors[0], errors


def test_every_torchsde_method_name_builds_a_solver():
    from torchmech.de.solvers.sde import SDE_METHODS

    y0, t = torch.randn(3, 2), torch.linspace(0, 1, 4)
    for name in SDE_METHODS:
        sde_type = "ito" if name in ("euler", "milstein") else "stratonovich"
        noise = "additive" if name == "srk" else "diagonal"
        out = NeuralSDE(2, hidden=4, sde_type=sde_type, noise=noise, solver=name, dt=0.1)(y0, t, seed=0)
        assert out.shape == (3, 4, 2) and torch.isfinite(out).all(), name


def test_wrongly_shaped_user_diffusion_is_named():
    """General noise needs g of shape (B, D, m): a (B, D) one used to fail inside a broadcast."""
    from torchmech.nn import NeuralSDE

    class G(torch.nn.Module):
        def forward(self, t, y):
            return torch.ones(y.shape[0], 2)

    with pytest.raises(ValueError, match=r"term 1 \(ControlTerm\) gives an increment of shape \(3,\)"):
        NeuralSDE(2, noise="general", diffusion=G())(torch.randn(3, 2), torch.linspace(0, 1, 3), seed=0)


def test_reversible_adjoint_names_the_calculus_and_fine_dt_names_the_resolution():
    with pytest.raises(ValueError, match="adjoint='reversible' solves with reversible_heun, a Stratonovich solver; "
                                         "pass sde_type='stratonovich'"):
        NeuralSDE(3, adjoint="reversible")
    NeuralSDE(3, adjoint="reversible", sde_type="stratonovich")
    model = NeuralSDE(2, dt=5e-5)  # float32: around t = 1000 the times are ~6e-5 apart
    with pytest.raises(ValueError, match=r"NeuralSDE: the step grid is finer than torch.float32 resolves the times.*dt = 5e-05"):
        model(torch.zeros(2, 2), torch.tensor([1000.0, 1001.0]), seed=0)


def test_an_activation_instance_is_copied_per_layer():
    """A PReLU instance was one module (one learnable slope) shared by every layer, drift and diffusion."""
    model = NeuralSDE(2, noise="general", depth=2, activation=torch.nn.PReLU())
    prelus = [m for m in model.modules() if isinstance(m, torch.nn.PReLU)]
    assert len(prelus) >= 4 and len({id(m) for m in prelus}) == len(prelus)


@pytest.mark.parametrize("noise", ["additive", "general"])
def test_ito_backsolve_with_non_diagonal_noise(noise):
    """Ito SDEs with additive or general noise take the stochastic adjoint (refused before): its gradients
    approach backpropagation's through the same fine-stepped solve."""
    torch.manual_seed(5)
    kw = dict(state=2, hidden=8, depth=1, noise=noise, dt=1 / 128)
    direct = NeuralSDE(**kw).double()
    back = NeuralSDE(**kw, adjoint="backsolve").double()
    back.load_state_dict(direct.state_dict())
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    grads = []
    for model in (direct, back):
        bm = de.BrownianInterval(0.0, 1.0, (4, 2), dtype=DT, seed=11)  # (brownian_size defaults to the state's 2)
        loss = model(y0, t, brownian=bm).pow(2).sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 0.05


@pytest.mark.parametrize("noise,solver,cls", [("diagonal", "srk", "SRI2"), ("scalar", "srk", "SRI2"),
                                              ("additive", "srk", "SRA1"), ("scalar", "milstein", "Milstein"),
                                              ("additive", "milstein", "Milstein")])
def test_solver_names_per_noise_type(noise, solver, cls):
    """As torchsde: srk is SRI2 for diagonal/scalar noise (its Brownian motion gets the Levy area), milstein takes
    scalar and additive noise too."""
    model = NeuralSDE(2, hidden=4, noise=noise, solver=solver, dt=0.1)
    assert type(model.solver).__name__ == cls
    y0 = torch.randn(3, 2)
    out = model(y0, torch.linspace(0, 1, 4), seed=0)
    assert out.shape == (3, 4, 2) and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="needs noise='diagonal' or 'scalar'"):
        NeuralSDE(2, noise="general", solver=de.SRI2())
