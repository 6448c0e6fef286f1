"""Equation discovery benchmark: torchmech SINDy (batched) against PySINDy 2.x on polynomial ODEBench systems.

Both sides get the same data, the same polynomial library (degree 3), the same derivative method
(second-order finite differences), STLSQ, and the same threshold-selection rule: on a grid of
thresholds, the largest one whose training derivative MSE is within 5% of the smallest MSE over the
grid. Problems: the ODEBench systems whose right-hand side lies in the degree-3 polynomial library
(plus Lorenz and Rossler), 512 samples on t in [0, 10] from each of the two default initial
conditions, noise 0, 1% and 5% of each variable's std, 3 noise seeds. Held-out trajectory R2:
the model fitted on one initial condition is integrated (scipy, same for both sides) from the
other one over t in [0, 2.5] and compared with the clean simulation.

    .venv/bin/python benchmarks/discovery.py [--quick] [--device cpu|cuda] [--no-pysindy]

PySINDy is an optional dependency (``pip install pysindy``); without it only torchmech runs.
Optimiser defaults differ and are kept: torchmech STLSQ alpha=0 on unit-RMS columns, PySINDy
STLSQ alpha=0.05 on raw columns.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import sympy
import torch
from scipy.integrate import solve_ivp

from torchmech import systems
from torchmech.discovery import STLSQ, FiniteDifference, PolynomialLibrary, fit_sindy_batch, metrics

T_SAMPLES, T_END, HELD_END = 512, 10.0, 2.5
NOISES = (0.0, 0.01, 0.05)
SEEDS = (0, 1, 2)
GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def problems(quick: bool):
    lib = PolynomialLibrary(3)
    out = []
    for name in systems.names("odebench") + ["lorenz", "rossler"]:
        s = systems.get(name)
        try:
            s.true_coefficients(lib)
        except ValueError:
            continue
        out.append(s)
    return out[::4] if quick else out


def choose(mse: np.ndarray) -> np.ndarray:
    """mse (G, P) over the threshold grid -> index of the largest threshold within 5% of the best."""
    best = mse.min(0)
    ok = mse <= 1.05 * best + 1e-300
    return np.array([np.nonzero(ok[:, p])[0].max() for p in range(mse.shape[1])])


class _OutOfBudget(Exception):
    pass


def held_out_r2(coef: np.ndarray, names: list[str], variables: list[str], y0, clean: np.ndarray, t: np.ndarray,
                max_evals: int = 20_000):
    """Integrate x' = coef @ features(x) (features given by sympy names) and score against clean data.

    A model that diverges, or that needs more than ``max_evals`` right-hand-side evaluations (a
    spurious stiff term can otherwise keep LSODA busy for many minutes), scores ``-inf``.
    """
    syms = sympy.symbols(variables)
    feats = [sympy.sympify(n.replace(" ", "*").replace("^", "**"), locals=dict(zip(variables, syms))) for n in names]
    f = sympy.lambdify(syms, feats, "numpy")
    evals = [0]

    def rhs(_t, y):
        evals[0] += 1
        if evals[0] > max_evals:
            raise _OutOfBudget
        th = np.array([np.broadcast_to(v, ()) for v in f(*y)], dtype=float)
        return coef @ th

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sol = solve_ivp(rhs, (t[0], t[-1]), y0, t_eval=t, rtol=1e-7, atol=1e-7, method="LSODA")
    except _OutOfBudget:
        return -np.inf
    if not sol.success or sol.y.shape[1] != len(t) or not np.isfinite(sol.y).all():
        return -np.inf
    pred = sol.y.T
    return float(1 - ((pred - clean) ** 2).sum() / ((clean - clean.mean(0)) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every 4th system, one seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-pysindy", action="store_true")
    args = ap.parse_args()
    seeds = SEEDS[:1] if args.quick else SEEDS
    lib = PolynomialLibrary(3)
    t = torch.linspace(0, T_END, T_SAMPLES, dtype=torch.float64)
    t_held = np.linspace(0, HELD_END, 200)
    syss = problems(args.quick)
    # data: per system two clean trajectories; problems = (system, ic, noise, seed)
    rows = []  # dicts: system, D, ic, noise, seed, x (T, D) noisy, true (D, F)
    for s in syss:
        tr = systems.simulate(s, t)
        true = s.true_coefficients(lib)
        held_clean = [systems.simulate(s, torch.as_tensor(t_held), y0=s.y0[k]).x_clean.numpy() for k in (0, 1)]
        for ic in (0, 1):
            for noise in NOISES:
                for seed in seeds:
                    g = torch.Generator().manual_seed(1000 * seed + 10 * ic + int(100 * noise))
                    x = tr.x_clean[ic]
                    xn = x + noise * x.std(0) * torch.randn(x.shape, generator=g, dtype=x.dtype)
                    rows.append(dict(system=s, D=s.dim, ic=ic, noise=noise, seed=seed, x=xn, true=true,
                                     held_y0=np.array(s.y0[1 - ic]), held=held_clean[1 - ic]))
    print(f"{len(syss)} systems, {len(rows)} problems, library poly3, {T_SAMPLES} samples on [0, {T_END}]")
    results = {"torchmech": {}, "pysindy": {}}

    # ---- torchmech: one batched fit per (dimension, threshold)
    start = time.perf_counter()
    diff = FiniteDifference(2)
    for D in sorted({r["D"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["D"] == D]
        X = torch.stack([rows[i]["x"] for i in idx]).to(args.device)
        dX = diff(X, t.to(args.device))
        Theta = lib.transform(X)
        coefs, mses = [], []
        for th in GRID:
            C = fit_sindy_batch(X, t.to(args.device), lib, diff, STLSQ(th))
            coefs.append(C)
            mses.append((Theta @ C.transpose(-1, -2) - dX).square().mean((-2, -1)).cpu().numpy())
        pick = choose(np.stack(mses))
        for j, i in enumerate(idx):
            results["torchmech"][i] = coefs[pick[j]][j].cpu()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = {"torchmech": time.perf_counter() - start}

    # ---- PySINDy: a loop over problems and thresholds
    if not args.no_pysindy:
        try:
            import pysindy as ps
        except ImportError:
            print("pysindy is not installed: only torchmech runs (pip install pysindy)")
            args.no_pysindy = True
    if not args.no_pysindy:
        start = time.perf_counter()
        tn = t.numpy()
        for i, r in enumerate(rows):
            s = r["system"]
            xn = r["x"].numpy()
            fits, mses = [], []
            dx = ps.FiniteDifference(order=2)(xn, t=tn)
            for th in GRID:
                model = ps.SINDy(optimizer=ps.STLSQ(threshold=th), feature_library=ps.PolynomialLibrary(degree=3),
                                 differentiation_method=ps.FiniteDifference(order=2))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(xn, t=tn, feature_names=list(s.variables))
                mses.append(float(((model.predict(xn) - dx) ** 2).mean()))
                fits.append(model)
            model = fits[choose(np.array(mses)[:, None])[0]]
            names = model.get_feature_names()
            feats = [sympy.sympify(n.replace(" ", "*").replace("^", "**"),
                                   locals={v: sympy.Symbol(v) for v in s.variables}) for n in names]
            results["pysindy"][i] = (torch.as_tensor(model.coefficients()), feats, names)
        wall["pysindy"] = time.perf_counter() - start

    # ---- metrics (held-out R2 integrated the same way for both sides)
    table = []
    for side in ("torchmech", "pysindy"):
        if side not in wall:
            continue
        for noise in NOISES:
            exact, f1, err, r2 = [], [], [], []
            for i, r in enumerate(rows):
                if r["noise"] != noise:
                    continue
                s = r["system"]
                if side == "torchmech":
                    C, true = results[side][i], r["true"]
                    names = lib.feature_names(list(s.variables))
                else:
                    C, feats, names = results[side][i]
                    true = s.true_coefficients(feats)
                    C = C.to(torch.float64)
                exact.append(bool(metrics.exact_recovery(C, true)))
                f1.append(float(metrics.support_f1(C, true)))
                err.append(float(metrics.coefficient_error(C, true, "median")))
                r2.append(held_out_r2(C.numpy(), names, list(s.variables), r["held_y0"], r["held"], t_held))
            table.append((side, noise, 100 * np.mean(exact), np.mean(f1), 100 * statistics.median(err),
                          statistics.median(r2), wall[side]))
    print(f"\n{'method':<10} {'noise':>6} {'exact %':>8} {'F1':>6} {'med coef err %':>15} {'med held-out R2':>16}"
          f" {'fit wall s':>11}")
    for side, noise, ex, f1, err, r2, w in table:
        print(f"{side:<10} {noise:>6.2f} {ex:>8.1f} {f1:>6.3f} {err:>15.3f} {r2:>16.4f} {w:>11.2f}")
    if "pysindy" in wall:
        print(f"\nfit wall time (all problems, threshold grid of {len(GRID)}): torchmech {wall['torchmech']:.2f} s, "
              f"PySINDy {wall['pysindy']:.2f} s, ratio {wall['pysindy'] / wall['torchmech']:.1f}x")


if __name__ == "__main__":
    main()
