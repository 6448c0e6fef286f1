"""ReversibleAdjoint: gradients equal direct backpropagation through Reversible Heun."""

import pytest
import torch

import torchmech.de as de
from torchmech.de.reversible_adjoint import ReversibleAdjoint
from torchmech.de.solvers.sde import ReversibleHeun
from torchmech.de.terms import DiagonalControlTerm

DT = torch.float64


class Drift(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, d))

    def forward(self, t, y, args):
        return self.net(torch.cat([y, t[:, None]], -1))


class Diffusion(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, t, y, args):
        return 0.3 * torch.sigmoid(self.lin(y))


def _setup(n=6, d=3, general=False):
    torch.manual_seed(0)
    f, g = Drift(d).double(), Diffusion(d).double()
    if general:
        bm = de.BrownianInterval(0.0, 1.0, (n, 2), dtype=DT, seed=1)
        lin = torch.nn.Linear(d, 2 * d).double()

        class G(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = lin

            def forward(self, t, y, args):
                return 0.2 * torch.tanh(self.lin(y)).reshape(y.shape[0], d, 2)

        g = G()
        terms = de.MultiTerm(de.ODETerm(f), de.ControlTerm(g, bm))
    else:
        bm = de.BrownianInterval(0.0, 1.0, (n, d), dtype=DT, seed=1)
        terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    y0 = torch.randn(n, d, dtype=DT, requires_grad=True)
    params = [y0] + list(f.parameters()) + list(g.parameters())
    return terms, y0, params


@pytest.mark.parametrize("general", [False, True])
def test_gradients_equal_direct(general):
    terms, y0, params = _setup(general=general)
    ts = torch.tensor([0.0, 0.33, 0.5, 1.0], dtype=DT)
    saveat = de.SaveAt(ts=ts, t1=True, t0=True)
    grads = []
    for adjoint in (de.DirectAdjoint(), ReversibleAdjoint()):
        sol = de.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=0.02, saveat=saveat, adjoint=adjoint)
        loss = (sol.ys ** 2).sum() + sol.ys[..., 0].sum()
        grads.append(torch.autograd.grad(loss, params))
        vals = sol.ys.detach()
        if len(grads) == 1:
            ref_vals = vals
    torch.testing.assert_close(vals, ref_vals, rtol=0, atol=0)
    for gd, gr in zip(*grads):
        torch.testing.assert_close(gr, gd, rtol=1e-8, atol=1e-12)


def test_args_gradients_and_ode():
    k = torch.tensor([0.5, 1.5], dtype=DT, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0]], dtype=DT, requires_grad=True)
    bm = de.VirtualBrownianTree(0.0, 2.0, (2, 1), tol=1e-5, dtype=DT, seed=0)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -a[:, None] * y + torch.sin(t)[:, None]),
                         DiagonalControlTerm(lambda t, y, a: 0.2 * torch.cos(y), bm))
    out = []
    for adjoint in (de.DirectAdjoint(), ReversibleAdjoint()):
        sol = de.solve(terms, ReversibleHeun(), 0.0, 2.0, y0, args=k, dt0=0.05, adjoint=adjoint)
        out.append(torch.autograd.grad(sol.ys.sum(), [k, y0]))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


def test_memory_does_not_keep_a_graph():
    terms, y0, params = _setup()
    sol = de.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=0.01, adjoint=ReversibleAdjoint())
    # the only autograd node is the reversible Function itself, holding parameters only
    fn = sol.ys.grad_fn
    assert type(fn).__name__ == "_ReversibleFnBackward"
    assert len(fn.saved_tensors) == len(params) - 1
    assert all(s.shape == p.shape for s, p in zip(fn.saved_tensors, params[1:]))
    # its inputs are leaves directly: no per-step graph behind the output
    assert all(nf is None or type(nf).__name__ == "AccumulateGrad" for nf, _ in fn.next_functions)


def test_errors():
    terms, y0, _ = _setup()
    with pytest.raises(ValueError, match="ReversibleHeun"):
        de.solve(terms, de.EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1, adjoint=ReversibleAdjoint())
    with pytest.raises(ValueError, match="dense"):
        de.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=0.1, adjoint=ReversibleAdjoint(),
                 saveat=de.SaveAt(dense=True))


def test_final_state_gradient_without_saving_t1():
    """sol.y_final was detached unless SaveAt(t1=True): its part of the loss got no gradient."""
    terms, y0, params = _setup()
    saveat = de.SaveAt(ts=torch.tensor([0.25, 0.5], dtype=DT))
    grads = []
    for adjoint in (de.DirectAdjoint(), ReversibleAdjoint()):
        sol = de.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=0.05, saveat=saveat, adjoint=adjoint)
        grads.append(torch.autograd.grad(sol.ys.sum() + (sol.y_final ** 2).sum(), params))
    for gd, gr in zip(*grads):
        torch.testing.assert_close(gr, gd, rtol=1e-8, atol=1e-12)
