"""NeuralODE: fits a linear spiral, shapes and dtypes, adjoint gradients, clear errors."""

import pytest
import torch

from torchmech.de import BacksolveAdjoint, Dopri5
from torchmech.nn import NeuralODE

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


def _spiral_data(n=64, T=12, dtype=torch.float32):
    t = torch.linspace(0, 1.0, T, dtype=dtype)
    y0 = (torch.rand(n, 2) * 4 - 2).to(dtype)
    ys = torch.einsum("tij,bj->bti", torch.matrix_exp(t[:, None, None] * A.to(dtype)), y0)
    return y0, t, ys


def test_fits_linear_spiral():
    y0, t, ys = _spiral_data()
    model = NeuralODE(state=2, hidden=32, depth=1, rtol=1e-3, atol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        loss = (model(y0, t) - ys).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


class LinearField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(2, 2))

    def forward(self, t, y):
        assert t.shape == y.shape[:1]  # one time per sample
        return y @ self.W.T


def test_user_vector_field_recovers_matrix():
    y0, t, ys = _spiral_data()
    model = NeuralODE(LinearField(), state=2)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=40, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (model(y0, t) - ys).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(model.func.net.W.detach(), A, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_per_sample_times(dtype):
    model = NeuralODE(state=3, hidden=8, time_dependent=True).to(dtype)
    y0 = torch.randn(5, 3, dtype=dtype)
    out = model(y0, torch.linspace(0, 1, 7))
    assert out.shape == (5, 7, 3) and out.dtype == dtype
    torch.testing.assert_close(out[:, 0], y0)
    t = torch.linspace(0, 1, 4, dtype=dtype) * torch.arange(1, 6, dtype=dtype)[:, None]  # (B, T) per sample
    out = model(y0, t)
    assert out.shape == (5, 4, 3)
    single = model(y0[2:3], t[2])
    torch.testing.assert_close(out[2:3], single, rtol=1e-4, atol=1e-5)
    assert model(y0[:1], [0.0]).shape == (1, 1, 3)
    back = model(out[:, -1], t.flip(-1))  # decreasing times integrate backwards
    torch.testing.assert_close(back[:, -1], y0, rtol=1e-2, atol=1e-3)
    assert model.vector_field(0.0, y0).shape == (5, 3)


def test_fixed_step_and_solver_instance():
    model = NeuralODE(state=2, hidden=8, solver="rk4", dt=0.05)
    sol = model.solve(torch.randn(3, 2), torch.linspace(0, 1, 5))
    assert sol.ys.shape == (3, 5, 2) and bool((sol.stats["num_steps"] == 20).all())
    assert NeuralODE(state=2, solver=Dopri5())(torch.randn(2, 2), [0.0, 0.5]).shape == (2, 2, 2)


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_adjoint_gradients_match_direct(adjoint):
    torch.manual_seed(1)
    kw = dict(state=2, hidden=16, time_dependent=True, rtol=1e-9, atol=1e-11)
    direct = NeuralODE(**kw).double()
    other = NeuralODE(**kw, adjoint=adjoint).double()
    other.load_state_dict(direct.state_dict())
    y0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    target = torch.randn(4, 6, 2, dtype=torch.float64)
    grads = []
    for model in (direct, other):
        y = y0.clone().requires_grad_(True)
        loss = (model(y, t) - target).pow(2).sum()
        grads.append(torch.autograd.grad(loss, [y, *model.parameters()]))
    for g_direct, g_other in zip(*grads):
        torch.testing.assert_close(g_other, g_direct, rtol=1e-5, atol=1e-7)
    if adjoint == "backsolve":
        assert isinstance(other.adjoint, BacksolveAdjoint)


def test_errors():
    with pytest.raises(ValueError, match="vector_field .* or state"):
        NeuralODE()
    with pytest.raises(ValueError, match="needs a step size; pass dt"):
        NeuralODE(state=2, solver="rk4")
    with pytest.raises(ValueError, match="unknown solver 'rk9'"):
        NeuralODE(state=2, solver="rk9")
    with pytest.raises(ValueError, match="adjoint must be"):
        NeuralODE(state=2, adjoint="magic")
    with pytest.raises(TypeError, match="vector_field must be an nn.Module"):
        NeuralODE(lambda t, y: y)
    model = NeuralODE(state=2, hidden=4)
    with pytest.raises(ValueError, match=r"y0 must have shape \(batch, 2\), got \(2,\).*y0\[None\]"):
        model(torch.randn(2), torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match=r"y0 must have shape \(batch, 2\), got \(4, 3\)"):
        model(torch.randn(4, 3), torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match=r"t must have shape \(T,\) or \(batch, T\) = \(4, T\), got \(3, 3\)"):
        model(torch.randn(4, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="t must be monotonic"):
        model(torch.randn(4, 2), torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(TypeError, match="y0 has dtype torch.float64 but the model's parameters are torch.float32"):
        model(torch.randn(4, 2, dtype=torch.float64), torch.linspace(0, 1, 3))
    with pytest.raises(TypeError, match="y0 must be a torch.Tensor"):
        model([[0.0, 1.0]], torch.linspace(0, 1, 3))


def test_adjoint_tolerances_zero_and_bad_values():
    """adjoint_atol = 0 (pure relative control) is kept, not replaced by atol; bad tolerances name themselves."""
    import math

    from torchmech import NeuralODE

    m = NeuralODE(state=2, adjoint="backsolve", adjoint_atol=0.0)
    assert m.adjoint.atol == 0.0 and m.adjoint.rtol == m.rtol
    with pytest.raises(ValueError, match="BacksolveAdjoint: need finite numbers rtol > 0"):
        NeuralODE(state=2, adjoint="backsolve", adjoint_rtol="a")
    with pytest.raises(ValueError, match="NeuralODE: need finite rtol > 0"):
        NeuralODE(state=2, rtol=math.inf)


def test_float64_times_too_fine_for_a_float32_model_raise():
    """Minutes since the epoch (~2.8e7, 0.5 apart) all round to one float32: the model returned y0 at every time."""
    t = torch.tensor([1.7e9, 1.7e9 + 30.0, 1.7e9 + 60.0], dtype=torch.float64) / 60.0
    with pytest.raises(ValueError, match=r"NeuralODE: t: times given in torch.float64 are too fine for the state's "
                                         r"torch.float32.*shift the times towards 0"):
        NeuralODE(state=1)(torch.ones(2, 1), t)
    out = NeuralODE(state=1)(torch.ones(2, 1), t - t[0])  # shifted: fine
    assert out.shape == (2, 3, 1)
