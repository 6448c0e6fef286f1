"""MNN-based equation discovery: denoise windows, integrate the library ODE with NeuRLP, threshold in cycles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from torchmech.discovery.base import BaseDiscovery, as_trajectories
from torchmech.discovery.library import Library, PolynomialLibrary
from torchmech.mnn import solve_linear_ode

__all__ = ["MechanisticDiscovery", "MechanisticFit", "fit_mechanistic", "make_windows"]


class _Smoother(nn.Module):
    """Residual 1-D convolutional denoiser applied to every window (shared weights, any window count).

    Its last layer starts at zero, so training starts from the raw data and only learns a correction, and
    the correction has zero mean over each window.
    """

    def __init__(self, D: int, hidden: int = 32, kernel: int = 5):
        super().__init__()
        pad = kernel // 2
        self.net = nn.Sequential(
            nn.Conv1d(D, hidden, kernel, padding=pad, padding_mode="replicate"), nn.Tanh(),
            nn.Conv1d(hidden, hidden, kernel, padding=pad, padding_mode="replicate"), nn.Tanh(),
            nn.Conv1d(hidden, D, kernel, padding=pad, padding_mode="replicate"),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:  # (N, W, D) -> (N, W, D)
        c = self.net(x.transpose(1, 2)).transpose(1, 2)
        # Noise has zero mean: a correction that shifted a whole window would only bias the constant term.
        return x + c - c.mean(1, keepdim=True)


def make_windows(xs: list[Tensor], ts: list[Tensor], window: int, stride: int) -> tuple[Tensor, Tensor]:
    """Cut every trajectory ``(T_i, D)`` into windows of ``window`` points every ``stride`` points.

    Returns windows ``(N, window, D)`` and their steps ``(N, window - 1)``; the last window of each
    trajectory is aligned with its end so no sample is left out.
    """
    wins, steps = [], []
    for x, t in zip(xs, ts):
        T = x.shape[0]
        starts = list(range(0, T - window + 1, stride))
        if starts[-1] != T - window:
            starts.append(T - window)
        idx = torch.tensor(starts, device=x.device)[:, None] + torch.arange(window, device=x.device)
        wins.append(x[idx])
        steps.append(torch.diff(t[idx].to(torch.float64), dim=-1).to(x.dtype))  # fine clocks: diff first
    return torch.cat(wins), torch.cat(steps)


@dataclass
class MechanisticFit:
    """Result of :func:`fit_mechanistic`: coefficients in the data's units and the training record."""

    coefficients: Tensor  # (D, F), zero outside the support
    mask: Tensor  # (D, F) bool
    history: list[dict] = field(default_factory=list)
    step_scale: float = 1.0


def _split_at_gaps(xs: list[Tensor], ts: list[Tensor], us: list[Tensor] | None, window: int):
    """Trajectories cut where a time step exceeds 10x the trajectory's median step (dropped rows, a pause in
    recording): a window across such a gap integrated over it as if the samples were neighbours (Lotka-Volterra
    with 3 time units missing came back as y' = -6.1 + 3.4 x + ...). Pieces shorter than ``window`` are left out;
    when none is long enough the trajectory is kept whole."""
    out_x, out_t, out_u = [], [], []
    for i, (x, t) in enumerate(zip(xs, ts)):
        dt = torch.diff(t.to(torch.float64))
        cuts = (dt > 10 * dt.median()).nonzero().squeeze(-1).tolist() if dt.numel() else []
        bounds = [0] + [c + 1 for c in cuts] + [x.shape[0]]
        pieces = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= window] or [(0, x.shape[0])]
        for a, b in pieces:
            out_x.append(x[a:b])
            out_t.append(t[a:b])
            if us is not None:
                out_u.append(us[i][a:b])
    return out_x, out_t, (out_u if us is not None else None)


def fit_mechanistic(xs: list[Tensor], ts: list[Tensor], library, *, threshold: float, us: list[Tensor] | None = None,
                    window: int = 32,
                    stride: int | None = None, cycles: int = 5, denoise: str | None = None,
                    iterations: int = 100, lr: float = 3e-3,
                    init_coefficients: Tensor | None = None, learn_step: bool = False,
                    weight_denoise: float = 10.0, progress: bool = True, seed: int | None = 0) -> MechanisticFit:
    """Discover ``x' = coefficients @ library(x)`` with the Mechanistic Neural Network recipe.

    Every trajectory is cut into overlapping windows. Per window the library is evaluated on a denoised
    state and the NeuRLP solver integrates ``u' = Theta(x_denoised) xi`` from the window's own initial
    state; the loss is the misfit between ``u`` and the data. Because the NeuRLP solution is linear in its
    right-hand side and its initial values, the misfit is quadratic in the coefficients and in the
    windows' initial states, so for a given denoised state both are found exactly (one batched NeuRLP
    solve per library feature and a small least-squares problem per variable) instead of by slow
    gradient descent. The window's initial state is an unknown too: the first data point is as noisy as
    the others.

    Training runs in ``cycles``; after each cycle, coefficients with ``|c| < threshold`` are removed for
    good (a persistent mask that multiplies the coefficients, so removed terms are zero), and a last exact
    fit on the final support removes the bias of the terms that were thresholded away.

    Denoisers (``denoise``):

    * ``None`` (default): the library is evaluated on the data itself. The integral form already
      averages the noise out of the misfit, and this is the most reliable choice we measured (Lorenz,
      1000 samples: exact support in 6/6 noise seeds at 1% noise, 3/6 at 5%, median coefficient error
      0.25% and 0.5%).
    * ``"network"``: the seed paper's choice, a shared residual convolutional network trained jointly
      with the coefficients and the windows' initial states by Adam (``iterations`` steps per cycle,
      learning rate ``lr``) on the data misfit plus ``weight_denoise`` times the denoiser's own misfit;
      after each cycle the coefficients are re-solved exactly for the trained denoiser. In the same
      measurement it did not beat ``None`` (it lets spurious small terms survive), so it is opt-in.
    * ``"spline"``: the library is evaluated on each trajectory's smoothing spline (GCV-chosen smoothing,
      :meth:`~torchmech.discovery.differentiation.SmoothingSpline.smooth`), still fitted to the raw data.
      This removes most of the errors-in-variables bias of evaluating nonlinear features on noisy data:
      on Lorenz (512 and 1000 samples, two initial conditions, 3 noise seeds) the median coefficient
      error fell from 0.27% to 0.13% at 1% noise and from 0.9% to 0.6% at 5% noise; exact support
      recovery stayed the same at 1% (12/12) and at 5% (1-2/12: spurious terms, not bias, limit it).

    Args:
        xs, ts: trajectories ``(T_i, D)`` and their increasing times ``(T_i,)``. Any time unit: the windows
            are solved in one whose median step is 0.01 (when the data's is outside [1e-3, 0.1]) and the
            coefficients come back per the data's unit. A trajectory is cut where a step exceeds 10x its
            median step (a gap in the recording); pieces shorter than ``window`` are left out.
        library: a :class:`torchmech.discovery.library.Library`, evaluated on ``[x, u]``.
        threshold: magnitude below which a coefficient is removed.
        us: optional control inputs ``(T_i, M)`` per trajectory (known, not denoised).
        init_coefficients: ``(D, F)`` warm start (e.g. a SINDy fit): its zeros start the mask.
        learn_step: learn a global scale of the time steps by gradient descent (``"network"`` only; for
            data whose time stamps are uncertain: coefficients are then in units of the learned time).
    """
    if denoise not in ("network", "spline", None):
        raise ValueError(f"denoise must be 'network', 'spline' or None, got {denoise!r}")
    if learn_step and denoise != "network":
        raise ValueError("learn_step=True needs denoise='network' (the step is learned by gradient descent)")
    if not (isinstance(window, int) and window >= 3):
        raise ValueError(f"window must be an int >= 3, got {window!r}")
    if min(x.shape[0] for x in xs) < window:
        raise ValueError(f"every trajectory needs at least window = {window} samples; the shortest has "
                         f"{min(x.shape[0] for x in xs)} (pass a smaller window)")
    xs, ts, us = _split_at_gaps(xs, ts, us, window)
    dtype, device = xs[0].dtype, xs[0].device
    D = xs[0].shape[-1]
    M = 0 if us is None else us[0].shape[-1]
    F = library.n_features(D + M)
    if seed is not None:
        torch.manual_seed(seed)
    stride = stride or max(1, window // 2)
    # Controls are cut into the same windows as the states (the library sees [x, u] per sample).
    Z, H = make_windows(xs if us is None else [torch.cat([x, u], -1) for x, u in zip(xs, us)], ts, window, stride)
    X, U = Z[..., :D], Z[..., D:]  # (N, W, D), (N, W, M); H (N, W-1)
    # The NeuRLP rows weigh the equation against the Taylor rows through the step's size, so a time unit with
    # steps far from ~0.01 biased the fit (Lorenz in milliseconds: y' = 39.0 x - 3.2 y instead of 28 x - y). The
    # windows are solved in a time unit whose median step is 0.01 when the data's lies outside [1e-3, 0.1];
    # the coefficients come back per the data's time unit (time_scale enters to_raw).
    h_med = float(H.median())
    time_scale = 1.0 if 1e-3 <= h_med <= 0.1 else h_med / 0.01
    H = H / time_scale
    N, W = X.shape[:2]
    scale_x = X.reshape(-1, D).std(0).clamp_min(torch.finfo(dtype).eps)  # (D,)

    def features(state: Tensor) -> Tensor:  # library on [state, u] in the data's units
        return library.transform(state if M == 0 else torch.cat([state, U], -1))

    with torch.no_grad():
        theta = features(X).reshape(-1, F)
        scale_f = theta.std(0)
        scale_f = torch.where(scale_f > 1e-12, scale_f, theta.abs().mean(0).clamp_min(1.0))  # constant: its size
    Xn = X / scale_x
    # xi[d, f] = raw[d, f] * to_raw[d, f], per the data's time unit (raw is per the solve's)
    to_raw = scale_x[:, None] / scale_f[None, :] / time_scale
    raw = torch.zeros(D, F, dtype=dtype, device=device)
    mask = torch.ones(D, F, dtype=torch.bool, device=device)
    if init_coefficients is not None:
        init_coefficients = init_coefficients.to(dtype=dtype, device=device)
        if init_coefficients.shape != (D, F):
            raise ValueError(f"init_coefficients must have shape (D, F) = {(D, F)}, got "
                             f"{tuple(init_coefficients.shape)}")
        raw, mask = init_coefficients / to_raw, init_coefficients != 0
    smoother = _Smoother(D).to(dtype=dtype, device=device) if denoise == "network" else None
    log_step = torch.zeros((), dtype=dtype, device=device, requires_grad=learn_step)
    zero1 = torch.zeros(1, 1, dtype=dtype, device=device)
    scalar_eq = torch.tensor([0.0, 1.0], dtype=dtype, device=device).reshape(1, 1, 1, 2)  # u' = r
    history: list[dict] = []

    def responses(steps: Tensor) -> Tensor:
        """Unit-norm response of each window to a unit initial value (no forcing), (N, W)."""
        g = solve_linear_ode(scalar_eq, zero1, torch.ones(1, 1, 1, dtype=dtype, device=device), steps)[..., 0, 0]
        return g / g.norm(dim=-1, keepdim=True)

    def least_squares(state: Tensor, raw: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, float]:
        """Exact coefficients for Theta evaluated on ``state`` (N, W, D); also the fitted trajectories
        (N, W, D) and their mean squared misfit to the (scaled) data."""
        with torch.no_grad():
            th = features(state * scale_x) / scale_f  # (N, W, F)
            steps = H * log_step.exp()
            basis = solve_linear_ode(scalar_eq, th.permute(2, 0, 1).unsqueeze(-1),
                                     torch.zeros(1, 1, 1, dtype=dtype, device=device), steps)[..., 0, 0]  # (F, N, W)
            g = responses(steps)

            def project(v: Tensor) -> Tensor:  # remove each window's component along g
                return v - (v * g).sum(-1, keepdim=True) * g

            A = project(basis).reshape(F, N * W).T
            target = project(Xn.permute(2, 0, 1)).reshape(D, N * W)
            raw = torch.zeros_like(raw)
            for d in range(D):
                keep = mask[d].nonzero().squeeze(-1)
                if keep.numel():
                    # Minimum-norm least squares by SVD: a library column that is identically zero (a state
                    # that stays at 0) makes A rank-deficient. lstsq's default drivers do not handle that
                    # reliably (CPU gelsy gave run-to-run different answers, CUDA gels assumes full rank).
                    raw[d, keep] = (torch.linalg.pinv(A[:, keep]) @ target[d, :, None])[:, 0]
            forced = torch.einsum("fnw,df->dnw", basis, raw)
            offset = ((Xn.permute(2, 0, 1) - forced) * g).sum(-1, keepdim=True)
            fitted = (forced + offset * g).permute(1, 2, 0)  # (N, W, D)
            misfit = (fitted - Xn).square().mean().item()
        return raw, fitted, misfit

    def train_network(raw: Tensor, mask: Tensor, bar_desc: str) -> Tensor:
        """Adam on the denoiser, coefficients and windows' initial states (the seed paper's loop)."""
        coeff = torch.zeros(1, D, D, 2, dtype=dtype, device=device)
        coeff[0, torch.arange(D), torch.arange(D), 1] = 1.0
        raw_p = raw.clone().requires_grad_(True)
        init_shift = torch.zeros(N, 1, D, 1, dtype=dtype, device=device, requires_grad=True)
        params = [raw_p, init_shift, *smoother.parameters()] + ([log_step] if learn_step else [])
        opt = torch.optim.Adam(params, lr=lr)
        bar = tqdm(range(iterations), desc=bar_desc, disable=None if progress else True, leave=False)
        for _ in bar:
            opt.zero_grad()
            xs_n = smoother(Xn)
            rhs = (features(xs_n * scale_x) / scale_f) @ (raw_p * mask).T
            u = solve_linear_ode(coeff, rhs, xs_n[:, :1, :, None] + init_shift, H * log_step.exp())
            loss = (u[..., 0] - Xn).square().mean() + weight_denoise * (xs_n - Xn).square().mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"MechanisticDiscovery: the loss became non-finite; try a smaller lr "
                                         f"(now {lr}) or a larger threshold")
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3e}")
        return raw_p.detach()

    state = Xn
    if denoise == "spline":
        from torchmech.discovery.differentiation import SmoothingSpline

        spline = SmoothingSpline()
        smooth = [spline.smooth(x, t) for x, t in zip(xs, ts)]
        Zs, _ = make_windows(smooth, ts, window, stride)
        state = Zs / scale_x
    cycle_bar = tqdm(range(cycles), desc="MechanisticDiscovery", disable=not progress)
    for cycle in cycle_bar:
        if denoise == "network":
            raw = train_network(raw, mask, f"cycle {cycle + 1}/{cycles}")
            with torch.no_grad():
                state = smoother(Xn)
        raw, _, misfit = least_squares(state, raw, mask)
        mask = mask & ((raw * to_raw).abs() >= threshold)
        history.append(dict(cycle=cycle + 1, misfit=misfit, support=int(mask.sum())))
        cycle_bar.set_postfix(misfit=f"{misfit:.2e}", terms=int(mask.sum()))
    # Debias: the exact fit on the final support (the last threshold removed terms after the last fit).
    raw, _, misfit = least_squares(state, raw, mask)
    history.append(dict(cycle="final", misfit=misfit, support=int(mask.sum())))
    xi = (raw * to_raw * mask).detach()
    return MechanisticFit(xi, mask, history, float(log_step.detach().exp()))


class MechanisticDiscovery(BaseDiscovery):
    """Equation discovery with a Mechanistic Neural Network (Pervez et al., ICML 2024, Section 5.1).

    The model is ``x' = C @ library([x, u])`` with a sparse (D, F) matrix ``C``. Unlike SINDy it never
    differentiates the data: each window of each trajectory is *integrated* by the NeuRLP solver
    (:func:`torchmech.mnn.solve_linear_ode`) from the window's own (unknown) initial state, and ``C`` is
    fitted to the data itself, which averages measurement noise instead of amplifying it. Training runs
    in ``cycles`` of fitting and hard thresholding with a persistent mask; see :func:`fit_mechanistic`
    for the algorithm and the two denoising modes.

    Compared with the seed paper's code: thresholded coefficients stay removed (its reset had no effect),
    the windows' initial states are fitted rather than taken from a noisy sample, the step can be
    learned, and for a fixed denoised state the coefficients are solved exactly rather than by slow
    gradient descent.

    Args:
        library: feature library (default ``PolynomialLibrary(degree=2)``).
        threshold: coefficients with ``|c| < threshold`` are removed after every cycle (default 0.5).
        window: samples per window (>= 3); ``stride`` between window starts (default ``window // 2``).
        cycles: fit-and-threshold cycles.
        denoise: ``None`` (library on the data), ``"spline"`` (library on each trajectory's smoothing
            spline: lower coefficient errors under noise) or ``"network"`` (the seed paper's
            convolutional smoother, trained by Adam for ``iterations`` steps per cycle at learning rate
            ``lr``, with ``weight_denoise`` on its own misfit).
        warm_start: ``None``, ``"sindy"`` (a weak-form :class:`~torchmech.discovery.sindy.SINDy` fit with
            the noise-adaptive ridge, same library and threshold, gives the initial support) or a (D, F)
            tensor. Measured on Lorenz (512 and 1000 samples, two initial conditions, 3 noise seeds):
            exact support at 5% noise in 8/12 fits with ``"sindy"`` against 2/12 without, at 1% noise
            11/12 against 12/12.
        learn_step: learn a global time-step scale (``denoise="network"`` only); ``step_scale_`` holds it
            and the coefficients are then per unit of learned time (simulate on ``t * step_scale_``).
        dtype: ``torch.float32`` or ``torch.float64`` to fit in (default: the data's dtype, integer
            data as float64); ``device``: where to fit (default: the data's device).
        progress: show a progress bar per cycle.
        seed: seeds the denoiser's initialisation (``None``: don't touch the global generator).

    Learned attributes (after :meth:`fit`): ``coefficients_`` (D, F), ``mask_`` (D, F) bool,
    ``history_`` (misfit and support size per cycle), ``step_scale_``, ``feature_names_``,
    ``variable_names_``, ``control_names_``.

    Example::

        model = MechanisticDiscovery(threshold=0.5).fit(x, t)   # x (T, 3) noisy Lorenz, t (T,)
        model.print()            # x' = -10.002 x + 10.001 y ...
        x_sim = model.simulate(x[0], t)
    """

    def __init__(self, library: Library | None = None, *, threshold: float = 0.5, window: int = 32,
                 stride: int | None = None, cycles: int = 5, denoise: str | None = None, iterations: int = 100,
                 lr: float = 3e-3, warm_start: str | Tensor | None = None, learn_step: bool = False,
                 weight_denoise: float = 10.0, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, progress: bool = True, seed: int | None = 0):
        library = PolynomialLibrary(degree=2) if library is None else library
        if not isinstance(library, Library):
            raise TypeError(f"library: expected a torchmech.discovery Library, got {type(library).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
        for name, value, low in (("cycles", cycles, 1), ("iterations", iterations, 1), ("window", window, 3)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
            raise ValueError(f"stride: expected None or an int >= 1, got {stride!r}")
        if denoise not in (None, "network", "spline"):
            raise ValueError(f"denoise: expected None, 'network' or 'spline', got {denoise!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        if isinstance(weight_denoise, bool) or not isinstance(weight_denoise, (int, float)) \
                or not math.isfinite(weight_denoise) or weight_denoise < 0:
            raise ValueError(f"weight_denoise: expected a finite number >= 0, got {weight_denoise!r}")
        if not (warm_start is None or warm_start == "sindy" or isinstance(warm_start, Tensor)):
            raise ValueError(f"warm_start: expected None, 'sindy' or a (D, F) tensor, got {warm_start!r}")
        if learn_step and denoise != "network":
            raise ValueError("learn_step=True needs denoise='network' (the step is learned by gradient descent)")
        if dtype not in (None, torch.float32, torch.float64):
            raise TypeError(f"dtype: expected None, torch.float32 or torch.float64, got {dtype!r}")
        self.library, self.threshold, self.window, self.stride, self.cycles = library, float(threshold), window, \
            stride, cycles
        self.denoise, self.iterations, self.lr, self.warm_start = denoise, iterations, float(lr), warm_start
        self.learn_step, self.weight_denoise, self.dtype = learn_step, float(weight_denoise), dtype
        self.device = None if device is None else torch.device(device)
        self.progress, self.seed = progress, seed

    def fit(self, x: Any, t: Any, u: Any = None, variable_names: Sequence[str] | None = None,
            control_names: Sequence[str] | None = None) -> "MechanisticDiscovery":
        """Fit the sparse model to one or several trajectories of the same system.

        Args:
            x: one trajectory (T, D), a batch (B, T, D) or a list of (T_i, D); each needs at least
                ``window`` samples.
            t: (T,) shared times, (B, T), a list of (T_i,), or a number (the time step).
            u: optional control inputs with the layout of ``x`` and M columns.
            variable_names, control_names: as in :class:`~torchmech.discovery.sindy.SINDy`.

        Returns:
            self.
        """
        xs, ts, us = as_trajectories(x, t, u, min_samples=self.window)
        dtype = self.dtype or (xs[0].dtype if xs[0].dtype in (torch.float32, torch.float64) else torch.float64)
        device = self.device or xs[0].device
        xs = [a.to(dtype=dtype, device=device) for a in xs]
        ts = [a.to(device=device) for a in ts]
        us = None if us is None else [a.to(dtype=dtype, device=device) for a in us]
        D, M = xs[0].shape[-1], 0 if us is None else us[0].shape[-1]
        vnames, cnames = self._names(variable_names, D, control_names, M)
        F = self.library.n_features(D + M)
        if sum(a.shape[0] for a in xs) < F:
            raise ValueError(f"x: {sum(a.shape[0] for a in xs)} samples in all, fewer than the {F} library "
                             "features; pass more data or a smaller library")
        init = None
        if isinstance(self.warm_start, Tensor):
            init = self.warm_start
        elif self.warm_start == "sindy":
            from torchmech.discovery.differentiation import WeakForm
            from torchmech.discovery.optimizers import STLSQ
            from torchmech.discovery.sindy import SINDy

            # weak form + noise-adaptive ridge: the most reliable SINDy variant in benchmarks/discovery.py
            sindy = SINDy(library=self.library, differentiation=WeakForm.fitting(
                              min(a.shape[0] for a in xs), min_rows=2 * F // len(xs)),
                          optimizer=STLSQ(threshold=self.threshold, alpha="auto"))
            init = sindy.fit(xs, ts, us, variable_names=vnames, control_names=cnames).coefficients_
        if init is not None and tuple(init.shape) != (D, F):
            raise ValueError(f"warm_start: expected coefficients of shape (D, F) = ({D}, {F}), got "
                             f"{tuple(init.shape)}")
        fit = fit_mechanistic(xs, ts, self.library, threshold=self.threshold, us=us, window=self.window,
                              stride=self.stride, cycles=self.cycles, denoise=self.denoise,
                              iterations=self.iterations, lr=self.lr, init_coefficients=init,
                              learn_step=self.learn_step, weight_denoise=self.weight_denoise,
                              progress=self.progress, seed=self.seed)
        self.mask_, self.history_, self.step_scale_ = fit.mask, fit.history, fit.step_scale
        self._set_fit(fit.coefficients, vnames, cnames)
        return self

    def __repr__(self) -> str:
        return (f"MechanisticDiscovery(library={self.library!r}, threshold={self.threshold}, window={self.window}, "
                f"cycles={self.cycles}, denoise={self.denoise!r})")
