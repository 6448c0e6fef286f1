"""LatentSDE: a variational latent SDE (encoder, posterior and prior SDEs, decoder) trained by its ELBO."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from torchmech.de.brownian import AbstractBrownian, WithZeroChannel
from torchmech.de.controllers import StepTo
from torchmech.de.integrate import SaveAt, solve
from torchmech.de.terms import DiagonalControlTerm, MultiTerm, ODETerm
from torchmech.nn._common import (
    PerDimensionMLP,
    check_like_module,
    check_times,
    mlp,
    positive_float,
    positive_int,
    step_grid,
)
from torchmech.nn.sde import make_brownian, sde_adjoint, sde_solver

__all__ = ["LatentSDE", "LatentSDEOutput"]

_LOG_2PI = math.log(2 * math.pi)


class LatentSDEOutput(NamedTuple):
    """What :meth:`LatentSDE.forward` returns.

    Attributes:
        elbo: scalar, the batch mean of ``log_likelihood - kl_weight * (kl_path + kl_init)``.
        log_likelihood: (B,) ``sum_t log p(x_t | z_t)`` along the sampled posterior path.
        kl_path: (B,) ``int 1/2 |(f_post - f_prior) / g|^2 dt`` along that path (the KL divergence
            between posterior and prior path measures, by Girsanov's theorem, one-sample estimate).
        kl_init: (B,) ``KL(q(z0 | x) || p(z0))`` in closed form (diagonal Gaussians).
        latent: (B, T, latent_dim) the posterior sample path at the observation times.
        reconstruction: (B, T, data_dim) its decoded means.
    """

    elbo: Tensor
    log_likelihood: Tensor
    kl_path: Tensor
    kl_init: Tensor
    latent: Tensor
    reconstruction: Tensor


def _context_at(t: Tensor, ts: Tensor, ctx: Tensor) -> Tensor:
    """Context of the observation interval holding ``t``: ``ctx[b, k]`` with ``ts[b, k] <= t[b] < ts[b, k+1]``."""
    k = torch.searchsorted(ts, t.detach().to(ts.dtype)[:, None].contiguous(), right=True) - 1  # (B, 1)
    k = k.clamp(0, ts.shape[1] - 1)
    return ctx.gather(1, k[..., None].expand(-1, 1, ctx.shape[-1]))[:, 0]


class LatentSDE(nn.Module):
    """Latent SDE model of time series (Li et al., 2020, "Scalable gradients for SDEs"), trained by its ELBO.

    Generative model (the prior): ``z0 ~ N(m, s^2)`` (learned), ``dz = h(z) dt + g(z) dW``,
    ``x_t ~ N(decoder(z_t), noise_std^2)``. Approximate posterior: a GRU runs over the observations
    backwards in time and gives a context ``c_k`` summarising ``x_k, ..., x_{T-1}``; ``q(z0 | x)`` is a
    Gaussian from ``c_0``, and the posterior SDE ``dz = f(z, c(t)) dt + g(z) dW`` shares the
    diagonal diffusion ``g`` with the prior (``c(t) = c_k`` on ``[t_k, t_{k+1})``). Then

    ``ELBO = E_q[sum_t log p(x_t | z_t)] - KL(q(z0) || p(z0)) - E_q[int 1/2 |(f - h) / g|^2 dt]``,

    estimated with one posterior path per series: the state ``[z, KL accumulator]`` is solved
    as one SDE by :func:`torchmech.solve` (the accumulator has zero diffusion), with fixed steps
    landing on the observation times.

    Args:
        data_dim: channels of the observations.
        latent_dim: size of the latent state.
        context_dim: size of the encoder's context.
        hidden: width of the GRU and of the drift/diffusion networks.
        depth, activation: hidden layers and activation of the drift and diffusion networks.
        noise_std: standard deviation of the Gaussian observation noise (learned when
            ``learn_noise_std``).
        solver: SDE solver name ("euler" (default, Ito), "milstein", "heun", "euler_heun") or an
            ``AbstractSDESolver``; the calculus follows the solver.
        dt: largest step between observation times (``None``: one step per observation interval).
        adjoint: "direct" or "checkpoint" (same gradients, less memory), "backsolve" (the stochastic
            adjoint: O(1) memory in the steps, gradients within the discretisation error of the direct
            ones) or an ``AbstractAdjoint``.

    Shapes (batch-first): ``ts`` (T,) shared or (B, T) per series, strictly increasing, T >= 2;
    ``xs`` (B, T, data_dim), finite.

    Example::

        model = LatentSDE(data_dim=1, latent_dim=4, context_dim=16, hidden=32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(200):
            opt.zero_grad()
            loss = -model.elbo(ts, xs)          # ts (T,), xs (B, T, 1)
            loss.backward()
            opt.step()
        samples = model.sample(ts, 16, seed=0)  # (16, T, 1) from the prior
    """

    def __init__(self, data_dim: int, latent_dim: int = 4, context_dim: int = 16, hidden: int = 64, *,
                 depth: int = 1, activation: Any = "softplus", noise_std: float = 0.1,
                 learn_noise_std: bool = False, solver: Any = "euler", dt: float | None = None,
                 adjoint: Any = "direct"):
        super().__init__()
        name = "LatentSDE"
        self.data_dim = positive_int(data_dim, "data_dim", name)
        self.latent_dim = L = positive_int(latent_dim, "latent_dim", name)
        self.context_dim = C = positive_int(context_dim, "context_dim", name)
        positive_int(hidden, "hidden", name)
        positive_int(depth, "depth", name, minimum=0)
        noise_std = positive_float(noise_std, "noise_std", name)
        self.encoder = nn.GRU(data_dim, hidden, batch_first=True)
        self.encoder_out = nn.Linear(hidden, C)
        self.qz0 = nn.Linear(C, 2 * L)
        self.pz0_mean = nn.Parameter(torch.zeros(L))
        self.pz0_logstd = nn.Parameter(torch.zeros(L))
        self.posterior_drift = mlp(L + C, L, hidden, depth, activation, name)
        self.prior_drift = mlp(L, L, hidden, depth, activation, name)
        self.diffusion = PerDimensionMLP(L, 1, hidden, depth, activation, name, final=nn.Sigmoid())
        self.decoder = nn.Linear(L, data_dim)
        log_std = torch.tensor(math.log(noise_std))
        if learn_noise_std:
            self.log_noise_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_noise_std", log_std)
        self.solver = sde_solver(solver, None, "diagonal", name)
        self.adjoint = sde_adjoint(adjoint, self.solver, name, reversible=False)
        self.dt = positive_float(dt, "dt", name, allow_none=True)
        # the solver fixes the calculus; the KL rate 1/2 |(f - h)/g|^2 is the same in both
        # because posterior and prior share g

    # -- pieces -----------------------------------------------------------------------------
    def _g(self, t: Tensor, z: Tensor, args: Any = None) -> Tensor:
        return self.diffusion(z[..., None])

    def _prior_f(self, t: Tensor, z: Tensor, args: Any = None) -> Tensor:
        return self.prior_drift(z)

    def _augmented_drift(self, t: Tensor, za: Tensor, args: Any) -> Tensor:
        ts, ctx = args
        z = za[:, :-1]
        f = self.posterior_drift(torch.cat([z, _context_at(t, ts, ctx)], dim=-1))
        u = (f - self.prior_drift(z)) / self.diffusion(z[..., None])
        return torch.cat([f, 0.5 * (u * u).sum(-1, keepdim=True)], dim=-1)

    def _augmented_diffusion(self, t: Tensor, za: Tensor, args: Any) -> Tensor:
        g = self.diffusion(za[:, :-1, None])
        return torch.cat([g, torch.zeros_like(g[:, :1])], dim=-1)

    def encode(self, xs: Tensor) -> Tensor:
        """Context (B, T, context_dim): row ``k`` summarises ``xs[:, k:]`` (a GRU run backwards in time)."""
        out, _ = self.encoder(xs.flip(1))
        return self.encoder_out(out).flip(1)

    def _check(self, ts: Any, xs: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(xs, Tensor):
            raise TypeError(f"LatentSDE: xs must be a tensor of shape (batch, T, {self.data_dim}), got "
                            f"{type(xs).__name__}")
        if xs.dim() != 3 or xs.shape[-1] != self.data_dim or xs.shape[0] == 0:
            raise ValueError(f"LatentSDE: xs must have shape (batch, T, data_dim={self.data_dim}) with batch >= 1, "
                             f"got {tuple(xs.shape)}")
        if not xs.is_floating_point():
            raise TypeError(f"LatentSDE: xs must be float32 or float64, got {xs.dtype}")
        check_like_module(xs, "xs", "LatentSDE", self)
        if not bool(torch.isfinite(xs).all()):
            raise ValueError("LatentSDE: xs must be finite (no NaN/inf)")
        ts = check_times(ts, "ts", "LatentSDE", xs.shape[0], xs, strict=True, direction="increasing", min_len=2)
        if ts.shape[-1] != xs.shape[1]:
            raise ValueError(f"LatentSDE: ts has {ts.shape[-1]} times but xs has T={xs.shape[1]} observations "
                             "(xs is (batch, T, data_dim))")
        return ts, xs

    def _solve(self, terms, z0, ts, args):
        B = z0.shape[0]
        grid = step_grid(ts.expand(B, ts.shape[-1]), self.dt, "LatentSDE")
        if ts.dim() == 1:
            grid = grid[0]
        return solve(terms, self.solver, ts[..., 0], ts[..., -1], z0, args=args, saveat=SaveAt(ts=ts),
                     controller=StepTo(grid), adjoint=self.adjoint, max_steps=grid.shape[-1] + 1)

    # -- public -----------------------------------------------------------------------------
    def forward(self, ts: Any, xs: Tensor, *, kl_weight: float = 1.0, seed: int | None = None,
                brownian: AbstractBrownian | None = None) -> LatentSDEOutput:
        """ELBO and its parts for observations ``xs`` (B, T, data_dim) at times ``ts`` (T,) or (B, T).

        Args:
            kl_weight: weight of the KL terms (anneal it from small to 1 for easier training).
            seed: makes the estimate reproducible: seeds both ``z0``'s sample and the Brownian motion
                (a ``BrownianInterval``, whose path also depends on ``dt``; see ``NeuralSDE.forward``).
            brownian: a Brownian motion of shape (B, latent_dim) covering ``ts``; ``seed`` then seeds only
                ``z0``'s sample.
        """
        ts, xs = self._check(ts, xs)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not math.isfinite(kl_weight) \
                or kl_weight < 0:
            raise ValueError(f"LatentSDE: kl_weight must be a finite number >= 0, got {kl_weight!r}")
        B, T, _ = xs.shape
        L = self.latent_dim
        ctx = self.encode(xs)
        qm, qlogs = self.qz0(ctx[:, 0]).chunk(2, dim=-1)
        qs = qlogs.exp()
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"LatentSDE: seed must be an int or None, got {type(seed).__name__}")
            gen = torch.Generator(device=xs.device).manual_seed(seed)
            eps = torch.randn(qm.shape, generator=gen, dtype=qm.dtype, device=qm.device)
        else:
            eps = torch.randn_like(qm)
        z0 = qm + qs * eps
        tb = ts.expand(B, T).contiguous()
        bm_seed = None if (seed is None or brownian is not None) else seed + 1
        levy = getattr(self.solver, "uses_levy_area", False)
        bm = make_brownian(brownian, bm_seed, tb, (B, L), xs, levy, "LatentSDE")
        terms = MultiTerm(ODETerm(self._augmented_drift),
                          DiagonalControlTerm(self._augmented_diffusion, WithZeroChannel(bm)))
        za0 = torch.cat([z0, torch.zeros_like(z0[:, :1])], dim=-1)
        sol = self._solve(terms, za0, ts, (tb, ctx))
        zs = sol.ys[..., :L]
        kl_path = sol.ys[:, -1, L]
        recon = self.decoder(zs)
        log_s = self.log_noise_std
        loglik = (-0.5 * ((xs - recon) / log_s.exp()) ** 2 - log_s - 0.5 * _LOG_2PI).sum(dim=(1, 2))
        pm, plogs = self.pz0_mean, self.pz0_logstd
        kl_init = (plogs - qlogs + (qs ** 2 + (qm - pm) ** 2) / (2 * torch.exp(2 * plogs)) - 0.5).sum(-1)
        elbo = (loglik - kl_weight * (kl_path + kl_init)).mean()
        return LatentSDEOutput(elbo, loglik, kl_path, kl_init, zs, recon)

    def elbo(self, ts: Any, xs: Tensor, *, kl_weight: float = 1.0, seed: int | None = None,
             brownian: AbstractBrownian | None = None) -> Tensor:
        """Scalar ELBO (batch mean); maximise it (minimise ``-elbo``). Arguments as :meth:`forward`."""
        return self.forward(ts, xs, kl_weight=kl_weight, seed=seed, brownian=brownian).elbo

    def sample(self, ts: Any, batch_size: int, *, seed: int | None = None, return_latent: bool = False):
        """Series from the prior at times ``ts`` (T,): decoded means (batch_size, T, data_dim).

        ``z0 ~ N(pz0_mean, exp(pz0_logstd)^2)``, then the prior SDE ``dz = h(z) dt + g(z) dW``.
        With ``return_latent`` also the latent paths (batch_size, T, latent_dim).
        """
        positive_int(batch_size, "batch_size", "LatentSDE")
        p = self.pz0_mean
        ts = check_times(ts, "ts", "LatentSDE", batch_size, p.detach(), strict=True, direction="increasing",
                         min_len=2)
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"LatentSDE: seed must be an int or None, got {type(seed).__name__}")
            gen = torch.Generator(device=p.device).manual_seed(seed)
            eps = torch.randn((batch_size, self.latent_dim), generator=gen, dtype=p.dtype, device=p.device)
        else:
            eps = torch.randn((batch_size, self.latent_dim), dtype=p.dtype, device=p.device)
        z0 = p + self.pz0_logstd.exp() * eps
        tb = ts.expand(batch_size, ts.shape[-1]).contiguous()
        bm = make_brownian(None, None if seed is None else seed + 1, tb, (batch_size, self.latent_dim), z0,
                           getattr(self.solver, "uses_levy_area", False), "LatentSDE")
        terms = MultiTerm(ODETerm(self._prior_f), DiagonalControlTerm(self._g, bm))
        zs = self._solve(terms, z0, ts, None).ys
        xs = self.decoder(zs)
        return (xs, zs) if return_latent else xs

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, latent_dim={self.latent_dim}, context_dim={self.context_dim}, "
                f"solver={type(self.solver).__name__}, dt={self.dt}, adjoint={type(self.adjoint).__name__}")
