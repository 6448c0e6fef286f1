"""Equation discovery benchmark: torchmech SINDy (batched) against PySINDy 2.x on polynomial ODEBench systems.

Problems: the ODEBench systems whose right-hand side lies in the degree-3 polynomial library (plus
Lorenz and Rossler), 512 samples on t in [0, 10] from each of the two default initial conditions,
noise 0, 1% and 5% of each variable's std, 3 noise seeds: one problem per (system, initial
condition, noise, seed), each fitted on its single trajectory.

Every method gets the same data, the same polynomial library (degree 3) and the same
threshold-selection rule: on the grid GRID, blocked 5-fold cross-validation over the regression
rows (contiguous blocks in time; for every threshold the optimiser is fitted on four blocks and the
held-out block's mean squared derivative-target error is recorded) and the one-standard-error rule
(the largest threshold whose mean held-out error is within one standard error of the smallest),
applied per equation; a null model (no terms) only where it has the smallest held-out error. The rule
is ``torchmech.discovery.sindy.select_threshold``, fed with each method's own held-out errors and model
sizes; no ground truth enters it.

Methods (pairs share the derivative targets, so each pair differs only in the optimiser):

* ``tm FD2 a=0``   torchmech STLSQ, plain least squares (the previous setup), finite differences (order 2)
* ``tm FD2 auto``  torchmech STLSQ(alpha="auto") (noise-adaptive ridge), finite differences (order 2)
* ``ps FD2``       PySINDy FiniteDifference(order=2) + PolynomialLibrary(3) + STLSQ (defaults: alpha=0.05,
                   unbias), i.e. PySINDy's own pipeline
* ``tm weak auto`` torchmech weak SINDy: WeakForm() test-function windows + STLSQ(alpha="auto")
* ``ps weak``      PySINDy STLSQ (defaults) on exactly the same weak-form rows (features and targets
                   computed by torchmech's WeakForm; their cost is not in PySINDy's time)
* ``tm weak support``  the same rows and optimiser, ``fit_sindy_cv(search="support")``: candidate supports
                   (the grid's fits plus torchmech's backward-elimination path) scored by blocked CV of their
                   refits, one-SE rule over the candidates ordered by size, errors below 1e-10 of the targets'
                   mean square counted as exact
* ``ps weak support``  the same rule for PySINDy: its grid fits' supports, refitted on the training blocks by
                   least squares (how PySINDy's STLSQ ends, unbias=True), the same floor and selection

Held-out trajectory R2: the model fitted on one initial condition is integrated (scipy LSODA, the same
for all methods) from the other one over t in [0, 2.5] and compared with the clean simulation.
MechanisticDiscovery (``fit_mechanistic``, fixed threshold MNN_THRESHOLD = the CLI default, no
selection, window 32, 5 cycles) runs on the Lorenz problems, once from scratch and once warm-started
from the ``tm weak auto`` coefficients.

    .venv/bin/python benchmarks/discovery.py [--quick] [--device cpu|cuda] [--no-pysindy] [--no-mnn]

PySINDy is an optional dependency (``pip install pysindy``); without it only torchmech runs.
``--quick``: every 4th system and one seed (MNN: Lorenz, one seed).
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
from torchmech.discovery import STLSQ, FiniteDifference, PolynomialLibrary, metrics
from torchmech.discovery.differentiation import WeakForm
from torchmech.discovery.sindy import _EXACT_FLOOR, fit_sindy_cv, select_support, select_threshold

T_SAMPLES, T_END, HELD_END = 512, 10.0, 2.5
NOISES = (0.0, 0.01, 0.05)
SEEDS = (0, 1, 2)
GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
FOLDS = 5
MNN_THRESHOLD = 0.5
MNN_SYSTEMS = ("lorenz",)


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


class _OutOfBudget(Exception):
    pass


_FEATURE_FUNCTIONS: dict = {}


def _features(names: list[str], variables: list[str]):
    key = (tuple(names), tuple(variables))
    if key not in _FEATURE_FUNCTIONS:
        syms = sympy.symbols(variables)
        loc = dict(zip(variables, syms))
        feats = [sympy.sympify(n.replace(" ", "*").replace("^", "**"), locals=loc) for n in names]
        _FEATURE_FUNCTIONS[key] = sympy.lambdify(syms, feats, "numpy")
    return _FEATURE_FUNCTIONS[key]


def held_out_r2(coef: np.ndarray, names: list[str], variables: list[str], y0, clean: np.ndarray, t: np.ndarray,
                max_evals: int = 20_000):
    """Integrate x' = coef @ features(x) (features given by sympy names) and score against clean data.

    A model that diverges, or that needs more than ``max_evals`` right-hand-side evaluations (a
    spurious stiff term can otherwise keep LSODA busy for many minutes), scores ``-inf``.
    """
    f = _features(names, variables)
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


def make_rows(syss, seeds, t, t_held, lib):
    """One dict per problem: system, D, ic, noise, seed, x (T, D) noisy, true (D, F), held-out data."""
    rows = []
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
    return rows


def run_torchmech(rows, t, lib, diff, opt, device, search="threshold"):
    """Batched CV fits per dimension. Returns {row: (D, F) coefficients}, {row: candidate path}, wall s."""
    out, ceiling = {}, {}
    start = time.perf_counter()
    for D in sorted({r["D"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["D"] == D]
        X = torch.stack([rows[i]["x"] for i in idx]).to(device)
        res = fit_sindy_cv(X, t.to(device), lib, diff, opt, thresholds=GRID, folds=FOLDS, search=search)
        C, path = res.coefficients.cpu(), res.path.cpu()
        for j, i in enumerate(idx):
            out[i] = C[j]
            ceiling[i] = path[:, j]
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, ceiling, time.perf_counter() - start


def _cv_pysindy(ps, Theta: np.ndarray, dx: np.ndarray):
    """PySINDy STLSQ over the grid with the same folds: path (G, D, F), held-out errors (G, D, K)."""
    N = Theta.shape[0]
    block = np.arange(N) * FOLDS // N
    path, errs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for th in GRID:
            path.append(ps.STLSQ(threshold=th).fit(Theta, dx).coef_)
            e = []
            for k in range(FOLDS):
                tr, he = block != k, block == k
                c = ps.STLSQ(threshold=th).fit(Theta[tr], dx[tr]).coef_
                e.append(((Theta[he] @ c.T - dx[he]) ** 2).mean(0))
            errs.append(np.stack(e, -1))
    return np.stack(path), np.stack(errs)


def _support_cv_pysindy(Theta: np.ndarray, dx: np.ndarray, path: np.ndarray) -> np.ndarray:
    """search="support" for PySINDy: its grid fits' supports, each refitted on the training blocks the way
    PySINDy's STLSQ ends (unbias: least squares on the support), the same floor and one-SE rule over
    candidates ordered by size as fit_sindy_cv(search="support"). path (G, D, F) -> chosen (D, F)."""
    N = Theta.shape[0]
    block = np.arange(N) * FOLDS // N
    G, D, F = path.shape
    sup = path != 0
    errs = np.empty((G, D, FOLDS))
    for k in range(FOLDS):
        tr, he = block != k, block == k
        scale = (dx[he] ** 2).mean(0)
        for g in range(G):
            for d in range(D):
                c = np.zeros(F)
                if sup[g, d].any():
                    c[sup[g, d]] = np.linalg.lstsq(Theta[tr][:, sup[g, d]], dx[tr, d], rcond=None)[0]
                errs[g, d, k] = max(((Theta[he] @ c - dx[he, d]) ** 2).mean(), _EXACT_FLOOR * scale[d])
    idx = select_support(torch.as_tensor(errs), torch.as_tensor(sup.sum(-1))).numpy()  # (D,)
    return np.stack([path[idx[d], d] for d in range(D)])


def _select(path: np.ndarray, errs: np.ndarray) -> np.ndarray:
    """The same rule as fit_sindy_cv (one-SE, per equation) on PySINDy's errors -> (D, F)."""
    k = select_threshold(torch.as_tensor(errs), size=torch.as_tensor((path != 0).sum(-1))).numpy()  # (D,)
    return np.stack([path[k[d], d] for d in range(path.shape[1])])


def run_pysindy_fd(ps, rows, t):
    tn = t.numpy()
    out, ceiling = {}, {}
    start = time.perf_counter()
    for i, r in enumerate(rows):
        variables = list(r["system"].variables)
        xn = r["x"].numpy()
        dx = ps.FiniteDifference(order=2)(xn, t=tn)
        plib = ps.PolynomialLibrary(degree=3).fit(xn)
        Theta = np.asarray(plib.transform(xn))
        path, errs = _cv_pysindy(ps, Theta, np.asarray(dx))
        out[i] = (_select(path, errs), plib.get_feature_names(variables))
        ceiling[i] = path
    return out, ceiling, time.perf_counter() - start


def run_pysindy_weak(ps, rows, t, lib, weak):
    """PySINDy STLSQ on torchmech's weak-form rows (built first, outside the timed loop)."""
    systems_rows = {}
    for D in sorted({r["D"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["D"] == D]
        X = torch.stack([rows[i]["x"] for i in idx])
        Fw, dXw = weak.weak_system(X, t, lib.transform(X))
        for j, i in enumerate(idx):
            systems_rows[i] = (Fw[j].numpy(), dXw[j].numpy())
    out, ceiling, support = {}, {}, {}
    start = time.perf_counter()
    for i, r in enumerate(rows):
        path, errs = _cv_pysindy(ps, *systems_rows[i])
        out[i] = _select(path, errs)
        ceiling[i] = torch.as_tensor(path)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    for i, r in enumerate(rows):
        support[i] = _support_cv_pysindy(*systems_rows[i], ceiling[i].numpy())
    return out, ceiling, wall, support, wall + time.perf_counter() - start


def _sympy_features(names, variables):
    return [sympy.sympify(n.replace(" ", "*").replace("^", "**"), locals={v: sympy.Symbol(v) for v in variables})
            for n in names]


def score(rows, coefs, names_of, t_held, subset=None):
    """Per noise level: exact %, F1, median coefficient error %, median held-out R2, n problems."""
    table = {}
    for noise in NOISES:
        exact, f1, err, r2 = [], [], [], []
        for i, r in enumerate(rows):
            if r["noise"] != noise or (subset is not None and i not in subset):
                continue
            C, true, names = coefs[i], r["true"], names_of(i)
            C = torch.as_tensor(C, dtype=torch.float64)
            exact.append(bool(metrics.exact_recovery(C, true)))
            f1.append(float(metrics.support_f1(C, true)))
            err.append(float(metrics.coefficient_error(C, true, "median")))
            r2.append(held_out_r2(C.numpy(), names, list(r["system"].variables), r["held_y0"], r["held"], t_held))
        if exact:
            table[noise] = (100 * np.mean(exact), np.mean(f1), 100 * statistics.median(err), statistics.median(r2),
                            len(exact))
    return table


def ceiling_rate(rows, paths, true_of):
    """Fraction of problems where, per equation, SOME candidate (M, D, F) has the exact support (uses the truth)."""
    out = {}
    for noise in NOISES:
        hits = [bool(((torch.as_tensor(paths[i]) != 0) == (true_of(i) != 0)).all(-1).any(0).all())
                for i, r in enumerate(rows) if r["noise"] == noise]
        out[noise] = 100 * np.mean(hits)
    return out


def print_table(title, tables, walls):
    print(f"\n{title}")
    print(f"{'method':<15} {'noise':>6} {'n':>4} {'exact %':>8} {'F1':>6} {'med coef err %':>15} {'med held-out R2':>16}"
          f" {'fit wall s (all noise levels)':>30}")
    for name, table in tables.items():
        for noise, (ex, f1, err, r2, n) in table.items():
            print(f"{name:<15} {noise:>6.2f} {n:>4d} {ex:>8.1f} {f1:>6.3f} {err:>15.3f} {r2:>16.4f} {walls[name]:>30.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every 4th system, one seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-pysindy", action="store_true")
    ap.add_argument("--no-mnn", action="store_true")
    args = ap.parse_args()
    seeds = SEEDS[:1] if args.quick else SEEDS
    lib = PolynomialLibrary(3)
    t = torch.linspace(0, T_END, T_SAMPLES, dtype=torch.float64)
    t_held = np.linspace(0, HELD_END, 200)
    syss = problems(args.quick)
    rows = make_rows(syss, seeds, t, t_held, lib)
    print(f"{len(syss)} systems, {len(rows)} problems ({len(rows) // len(NOISES)} per noise level), library poly3 "
          f"({lib.n_features(3)} features for D=3), {T_SAMPLES} samples on [0, {T_END}], threshold grid {GRID}, "
          f"{FOLDS}-fold blocked CV, one-SE rule per equation")

    weak = WeakForm()
    tm_names = {}

    def tm_name_of(i):
        vs = tuple(rows[i]["system"].variables)
        if vs not in tm_names:
            tm_names[vs] = lib.feature_names(list(vs))
        return tm_names[vs]

    configs = {
        "tm FD2 a=0": (FiniteDifference(2), STLSQ(alpha=0.0), "threshold"),
        "tm FD2 auto": (FiniteDifference(2), STLSQ(alpha="auto"), "threshold"),
        "tm weak auto": (weak, STLSQ(alpha="auto"), "threshold"),
        "tm weak support": (weak, STLSQ(alpha="auto"), "support"),
    }
    coefs, names_of, walls, ceilings, true_of = {}, {}, {}, {}, {}
    warm = [r for r in rows if r["system"] is syss[0]][:2]  # warm-up (first calls, allocator) outside the timing
    for diff, opt, search in configs.values():
        run_torchmech(warm, t, lib, diff, opt, args.device, search)
    for name, (diff, opt, search) in configs.items():
        coefs[name], ceilings[name], walls[name] = run_torchmech(rows, t, lib, diff, opt, args.device, search)
        names_of[name] = tm_name_of
        true_of[name] = lambda i: rows[i]["true"]
        print(f"  {name}: {walls[name]:.2f} s", flush=True)

    if not args.no_pysindy:
        try:
            import pysindy as ps
        except ImportError:
            print("pysindy is not installed: only torchmech runs (pip install pysindy)")
            args.no_pysindy = True
    if not args.no_pysindy:
        run_pysindy_fd(ps, warm, t)
        res, ceil, walls["ps FD2"] = run_pysindy_fd(ps, rows, t)
        print(f"  ps FD2: {walls['ps FD2']:.2f} s", flush=True)
        coefs["ps FD2"] = {i: c for i, (c, _) in res.items()}
        ps_names = {i: n for i, (_, n) in res.items()}
        names_of["ps FD2"] = lambda i: ps_names[i]
        ps_true = {i: rows[i]["system"].true_coefficients(_sympy_features(ps_names[i], list(rows[i]["system"].variables)))
                   for i in res}
        true_of["ps FD2"] = lambda i: ps_true[i]
        ceilings["ps FD2"] = {i: torch.as_tensor(p) for i, p in ceil.items()}
        # score() compares with rows[i]["true"] in torchmech's feature order: re-express PySINDy's fits
        coefs["ps FD2"] = {i: _to_torchmech_order(coefs["ps FD2"][i], ps_names[i], tm_name_of(i),
                                                  list(rows[i]["system"].variables)) for i in res}
        names_of["ps FD2"] = tm_name_of
        (coefs["ps weak"], ceilings["ps weak"], walls["ps weak"], coefs["ps weak support"],
         walls["ps weak support"]) = run_pysindy_weak(ps, rows, t, lib, weak)
        ceilings["ps weak support"] = ceilings["ps weak"]
        for name in ("ps weak", "ps weak support"):
            names_of[name] = tm_name_of
            true_of[name] = lambda i: rows[i]["true"]
        print(f"  ps weak: {walls['ps weak']:.2f} s, with support search {walls['ps weak support']:.2f} s", flush=True)

    order = ["tm FD2 a=0", "tm FD2 auto", "ps FD2", "tm weak auto", "ps weak", "tm weak support", "ps weak support"]
    order = [o for o in order if o in coefs]
    tables = {name: score(rows, coefs[name], names_of[name], t_held) for name in order}
    print_table("SINDy, all problems (threshold by blocked CV + one-SE rule, per equation)", tables, walls)
    if "ps FD2" in walls:
        print(f"\nfit wall time, all problems, grid of {len(GRID)} x ({FOLDS} folds + 1): "
              f"FD2: torchmech {walls['tm FD2 auto']:.2f} s vs PySINDy {walls['ps FD2']:.2f} s "
              f"({walls['ps FD2'] / walls['tm FD2 auto']:.1f}x); weak: torchmech {walls['tm weak auto']:.2f} s "
              f"(incl. building the weak rows) vs PySINDy {walls['ps weak']:.2f} s (rows given) "
              f"({walls['ps weak'] / walls['tm weak auto']:.1f}x)")
    if "ps weak support" in walls:
        print(f"support search (weak rows): torchmech {walls['tm weak support']:.2f} s vs PySINDy "
              f"{walls['ps weak support']:.2f} s ({walls['ps weak support'] / walls['tm weak support']:.1f}x)")
    print("\nexact-recovery ceiling of the candidates (% of problems where, for every equation, SOME candidate "
          "gives its exact support; grid thresholds, plus the backward path for 'support' rows; uses the truth, "
          "diagnostic only):")
    for name in order:
        c = ceiling_rate(rows, ceilings[name], true_of[name])
        print(f"  {name:<14} " + "  ".join(f"noise {k:.2f}: {v:5.1f}" for k, v in c.items()))

    if not args.no_mnn:
        from torchmech.discovery.mechanistic import fit_mechanistic

        subset = [i for i, r in enumerate(rows) if r["system"].name in MNN_SYSTEMS]
        if args.quick and not subset:  # the quick system set skips Lorenz: add its problems
            extra = make_rows([systems.get(n) for n in MNN_SYSTEMS], seeds, t, t_held, lib)
            base = len(rows)
            rows.extend(extra)
            subset = list(range(base, len(rows)))
            for name, (diff, opt, search) in configs.items():
                if name == "tm weak auto":
                    more, _, _ = run_torchmech(extra, t, lib, diff, opt, args.device, search)
                    coefs[name].update({base + j: c for j, c in more.items()})
        mnn, mnn_warm = {}, {}
        start = time.perf_counter()
        for i in subset:
            x = rows[i]["x"].to(args.device)
            mnn[i] = fit_mechanistic([x], [t.to(args.device)], lib, threshold=MNN_THRESHOLD, window=32, cycles=5,
                                     progress=False).coefficients.cpu()
        walls["MNN"] = time.perf_counter() - start
        start = time.perf_counter()
        for i in subset:
            x = rows[i]["x"].to(args.device)
            mnn_warm[i] = fit_mechanistic([x], [t.to(args.device)], lib, threshold=MNN_THRESHOLD, window=32,
                                          cycles=5, progress=False,
                                          init_coefficients=coefs["tm weak auto"][i].to(x)).coefficients.cpu()
        walls["MNN warm"] = time.perf_counter() - start
        walls["tm weak (same)"] = walls["tm weak auto"]
        mt = {"MNN": score(rows, mnn, tm_name_of, t_held, set(subset)),
              "MNN warm": score(rows, mnn_warm, tm_name_of, t_held, set(subset)),
              "tm weak (same)": score(rows, coefs["tm weak auto"], tm_name_of, t_held, set(subset))}
        print_table(f"MechanisticDiscovery on {', '.join(MNN_SYSTEMS)} (fixed threshold {MNN_THRESHOLD}, window 32, "
                    f"5 cycles; 'warm' starts from the tm weak auto fit; tm weak row: those problems, wall time of "
                    f"the full sweep)", mt, walls)


def _to_torchmech_order(C: np.ndarray, ps_names: list[str], tm_names: list[str], variables: list[str]) -> torch.Tensor:
    """PySINDy coefficients (D, F) in PySINDy's feature order -> torchmech's feature order (same monomials)."""
    key = lambda e: sympy.srepr(sympy.expand(e))  # noqa: E731
    pos = {key(f): k for k, f in enumerate(_sympy_features(tm_names, variables))}
    out = np.zeros((C.shape[0], len(tm_names)))
    for j, f in enumerate(_sympy_features(ps_names, variables)):
        out[:, pos[key(f)]] = C[:, j]
    return torch.as_tensor(out)


if __name__ == "__main__":
    main()
