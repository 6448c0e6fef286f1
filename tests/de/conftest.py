"""Shared problems for the torchmech.de tests."""


import math

import numpy as np
import pytest
import torch


def _linear(t, y, args):
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=y.dtype)
    return y @ A.T


def _vdp(t, y, args):
    mu = 1.0
    return torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=-1)


def _lorenz(t, y, args):
    s, r, b = 10.0, 28.0, 8.0 / 3.0
    x, yy, z = y.unbind(-1)
    return torch.stack([s * (yy - x), x * (r - z) - yy, x * yy - b * z], dim=-1)


def _lotka(t, y, args):
    x, yy = y.unbind(-1)
    return torch.stack([1.5 * x - x * yy, -3.0 * yy + x * yy], dim=-1)


def _forced(t, y, args):
    return -y + torch.sin(3.0 * t)[:, None] + 0.5 * torch.cos(t)[:, None] * y


PROBLEMS = {
    "linear": (_linear, [[1.0, 0.0], [0.3, -2.0]], 5.0),
    "vanderpol": (_vdp, [[2.0, 0.0], [0.5, 1.0]], 5.0),
    "lorenz": (_lorenz, [[1.0, 1.0, 1.0], [-3.0, 2.0, 20.0]], 1.0),
    "lotka": (_lotka, [[3.0, 1.0], [1.0, 2.0]], 5.0),
    "forced": (_forced, [[1.0], [-0.5]], 5.0),
}


def scipy_reference(f, y0, t1, ts):
    """Reference from scipy DOP853 at rtol = atol = 1e-12, shape (B, T, D)."""
    from scipy.integrate import solve_ivp

    out = []
    for row in np.asarray(y0, dtype=np.float64):
        def rhs(t, y):
            yt = torch.tensor(y[None], dtype=torch.float64)
            tt = torch.tensor([t], dtype=torch.float64)
            return f(tt, yt, None)[0].numpy()

        r = solve_ivp(rhs, (0.0, t1), row, method="DOP853", rtol=1e-12, atol=1e-12, t_eval=np.asarray(ts))
        assert r.success
        out.append(r.y.T)
    return torch.tensor(np.stack(out))


def linear_exact(t, y0):
    """Exact solution of the "linear" problem y' = A y, A = [[-0.5, 1], [-1, -0.5]], at time t: (B, 2)."""
    e = math.exp(-0.5 * t)
    c, s = math.cos(t), math.sin(t)
    return torch.stack([e * (c * y0[:, 0] + s * y0[:, 1]), e * (-s * y0[:, 0] + c * y0[:, 1])], dim=-1)


class _Probs:
    problems = PROBLEMS
    scipy_reference = staticmethod(scipy_reference)
    linear_exact = staticmethod(linear_exact)


@pytest.fixture(scope="session")
def probs():
    """Test problems, the scipy reference solver and the exact linear solution."""
    return _Probs()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed, and one intra-op thread: these tests use tiny tensors, for which thread start-up and
    contention on a shared 2-core machine cost far more than they gain (restored afterwards)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
