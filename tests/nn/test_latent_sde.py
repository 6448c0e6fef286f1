"""LatentSDE: the ELBO improves on Ornstein-Uhlenbeck paths, KL terms are right, sampling, clear errors."""

import math

import pytest
import torch

import torchmech.de as de
from torchmech.nn import LatentSDE


def _ou_paths(n=64, T=20, theta=2.0, mu=0.5, sigma=0.4, seed=0):
    """Exact Ornstein-Uhlenbeck samples dx = theta (mu - x) dt + sigma dW on [0, 1]: ts (T,), xs (n, T, 1)."""
    gen = torch.Generator().manual_seed(seed)
    ts = torch.linspace(0, 1, T)
    x = 0.3 * torch.randn(n, generator=gen)
    xs = [x]
    for k in range(T - 1):
        e = math.exp(-theta * float(ts[k + 1] - ts[k]))
        x = mu + (x - mu) * e + sigma * math.sqrt((1 - e * e) / (2 * theta)) * torch.randn(n, generator=gen)
        xs.append(x)
    return ts, torch.stack(xs, 1)[..., None]


def test_elbo_improves_on_ornstein_uhlenbeck():
    ts, xs = _ou_paths()
    model = LatentSDE(1, latent_dim=2, context_dim=8, hidden=16, noise_std=0.05)

    def evaluate():
        with torch.no_grad():
            return model(ts, xs, seed=123)

    before = evaluate()
    torch.testing.assert_close(model.elbo(ts, xs, seed=123), before.elbo)  # fixed seed: fixed estimate
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    n = 60
    for step in range(n):
        loss = -model.elbo(ts, xs, kl_weight=min(1.0, 2 * (step + 1) / n))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    # before: about -7000 (random decoder); after: about -100
    assert after.elbo.item() > before.elbo.item() + 1000, (before.elbo.item(), after.elbo.item())
    assert after.log_likelihood.mean() > before.log_likelihood.mean()
    # the learned prior's samples look like the data: mean level near mu = 0.5, bounded spread
    samples = model.sample(ts, 256, seed=0)
    assert samples.shape == (256, 20, 1)
    assert abs(samples[:, -5:].mean().item() - xs[:, -5:].mean().item()) < 0.25


def test_kl_terms_match_their_definitions():
    torch.manual_seed(3)
    ts, xs = _ou_paths(n=5, T=6)
    ts = ts.double()
    xs = xs.double()
    model = LatentSDE(1, latent_dim=3, context_dim=4, hidden=8).double()
    with torch.no_grad():
        out = model(ts, xs, seed=0)
        # Euler-Maruyama with one step per interval: KL path = sum_k 1/2 |(f - h)/g|^2 (t_{k+1} - t_k)
        ctx = model.encode(xs)
        z = out.latent
        kl = torch.zeros(5, dtype=torch.float64)
        for k in range(5):
            f = model.posterior_drift(torch.cat([z[:, k], ctx[:, k]], -1))
            u = (f - model.prior_drift(z[:, k])) / model.diffusion(z[:, k, :, None])
            kl += 0.5 * (u ** 2).sum(-1) * (ts[k + 1] - ts[k])
        torch.testing.assert_close(out.kl_path, kl)
        # closed-form Gaussian KL against torch.distributions
        qm, qlogs = model.qz0(ctx[:, 0]).chunk(2, -1)
        q = torch.distributions.Normal(qm, qlogs.exp())
        p = torch.distributions.Normal(model.pz0_mean, model.pz0_logstd.exp())
        torch.testing.assert_close(out.kl_init, torch.distributions.kl_divergence(q, p).sum(-1))
        assert out.reconstruction.shape == (5, 6, 1) and out.latent.shape == (5, 6, 3)


def test_options_dtypes_and_brownian():
    ts, xs = _ou_paths(n=4, T=5)
    for solver in ("euler", "milstein", "heun"):
        model = LatentSDE(1, latent_dim=2, context_dim=3, hidden=8, solver=solver, dt=0.05, adjoint="checkpoint",
                          learn_noise_std=True)
        out = model(ts, xs)
        out.elbo.backward()
        assert torch.isfinite(out.elbo) and model.log_noise_std.grad is not None
    model = LatentSDE(1, latent_dim=2, context_dim=3, hidden=8).double()
    bm = de.BrownianInterval(0.0, 1.0, (4, 2), dtype=torch.float64, seed=0)
    a = model.elbo(ts.double(), xs.double(), brownian=bm, seed=1)
    b = model.elbo(ts.double(), xs.double(), brownian=bm, seed=1)
    assert a.dtype == torch.float64 and a.item() == b.item()
    per_sample = ts.double() * torch.tensor([1.0, 2.0, 1.5, 1.0], dtype=torch.float64)[:, None]
    assert torch.isfinite(model.elbo(per_sample, xs.double(), seed=0))
    xs_, zs = model.sample(ts.double(), 3, seed=0, return_latent=True)
    assert xs_.shape == (3, 5, 1) and zs.shape == (3, 5, 2)


def test_errors():
    model = LatentSDE(2, latent_dim=2, context_dim=3, hidden=4)
    ts = torch.linspace(0, 1, 5)
    with pytest.raises(ValueError, match=r"xs must have shape \(batch, T, data_dim=2\) .* got \(3, 5\)"):
        model(ts, torch.randn(3, 5))
    with pytest.raises(ValueError, match="ts has 4 times but xs has T=5"):
        model(ts[:4], torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="xs must be finite"):
        model(ts, torch.full((3, 5, 2), float("nan")))
    with pytest.raises(ValueError, match="ts must be strictly increasing"):
        model(ts.flip(0), torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="at least 2 time"):
        model.sample(ts[:1], 3)
    with pytest.raises(ValueError,
                       match="adjoint='reversible' is not supported; use 'direct', 'checkpoint' or 'backsolve'"):
        LatentSDE(2, adjoint="reversible")
    with pytest.raises(ValueError, match="the SRA1 solver needs noise='additive'"):
        LatentSDE(2, solver=de.SRA1())
    assert type(LatentSDE(2, solver="srk").solver).__name__ == "SRI2"  # torchsde's srk for diagonal noise
    for bad in (float("nan"), -0.5):
        with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
            model(ts, torch.randn(3, 5, 2), kl_weight=bad)


def test_backsolve_adjoint_gradients_reach_every_network():
    """The drift and diffusion are bound methods of the model; its encoder reaches them only through the
    context in args. Every parameter must get the direct gradient (up to the continuous adjoint's error)."""
    xs = torch.randn(4, 8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = torch.linspace(0, 1, 8, dtype=torch.float64)
    grads = {}
    for adjoint in ("direct", "backsolve"):
        torch.manual_seed(0)
        model = LatentSDE(1, 3, 8, 16, adjoint=adjoint).double()
        (-model.elbo(ts, xs, seed=0)).backward()
        grads[adjoint] = {n: p.grad for n, p in model.named_parameters()}
    # (the continuous adjoint differs from backpropagation through the steps by its discretisation error)
    for name, g in grads["direct"].items():
        b = grads["backsolve"][name]
        assert b is not None, name  # the drift, prior and diffusion networks used to get none
        assert torch.nn.functional.cosine_similarity(g.flatten(), b.flatten(), dim=0) > 0.9, name
    flat = [torch.cat([g[k].flatten() for k in sorted(g)]) for g in (grads["direct"], grads["backsolve"])]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


def test_latent_sde_with_sri2_gets_a_brownian_motion_with_levy_area():
    torch.manual_seed(0)
    model = LatentSDE(2, latent_dim=3, context_dim=4, hidden=8, solver="srk", dt=0.1)
    ts = torch.linspace(0, 1, 5)
    loss = -model.elbo(ts, torch.randn(3, 5, 2), seed=0)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert model.sample(ts, 2, seed=1).shape == (2, 5, 2)
