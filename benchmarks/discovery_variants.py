"""Variants of torchmech's weak-form SINDy on the problems of benchmarks/discovery.py (torchmech only).

Exact-recovery rate of the selected model and the grid ceiling (some threshold of the grid gives the
exact support; uses the truth, diagnostic only) for changes to one setting at a time against the
benchmark's configuration (WeakForm(width=33, power=4), STLSQ(alpha="auto"), the threshold grid,
5 blocked folds, the one-standard-error rule per equation):

    .venv/bin/python benchmarks/discovery_variants.py                 # all variants, noise 0 / 1% / 5%
    .venv/bin/python benchmarks/discovery_variants.py --noise 0.05 --only base,width17

Each variant fits all 222 problems of a noise level in one batched call per state dimension (~1 s).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import discovery as D
from torchmech.discovery import STLSQ, PolynomialLibrary, metrics
from torchmech.discovery.differentiation import WeakForm
from torchmech.discovery.sindy import fit_sindy_cv

FINE_GRID = tuple(float(x) for x in np.logspace(-3, 0, 13))

# name: (WeakForm kwargs, STLSQ kwargs, fit_sindy_cv kwargs)
VARIANTS = {
    "base": ({}, {}, {}),
    "width17": ({"width": 17}, {}, {}),
    "width25": ({"width": 25}, {}, {}),
    "width49": ({"width": 49}, {}, {}),
    "width65": ({"width": 65}, {}, {}),
    "power2": ({"power": 2}, {}, {}),
    "power6": ({"power": 6}, {}, {}),
    "folds10": ({}, {}, {"folds": 10}),
    "fine-grid": ({}, {}, {"thresholds": FINE_GRID}),
    "min-cv-error": ({}, {}, {"one_se": False}),
    "per-problem": ({}, {}, {"per_equation": False}),
    "prior0.3": ({}, {"prior_scale": 0.3}, {}),
    "prior3": ({}, {"prior_scale": 3.0}, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", default="0,0.01,0.05", help="comma-separated noise levels")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    D.NOISES = tuple(float(x) for x in args.noise.split(","))
    lib = PolynomialLibrary(3)
    t = torch.linspace(0, D.T_END, D.T_SAMPLES, dtype=torch.float64)
    rows = D.make_rows(D.problems(False), D.SEEDS, t, np.linspace(0, D.HELD_END, 100), lib)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    print(f"{len(rows)} problems; exact-recovery % of the selected model (grid ceiling %)")
    print(f"{'variant':<14}" + "".join(f"{'noise ' + str(n):>22}" for n in D.NOISES) + f"{'wall s':>9}")
    for name in names:
        weak_kw, opt_kw, cv_kw = VARIANTS[name]
        kw = dict(thresholds=D.GRID, folds=D.FOLDS)
        kw.update(cv_kw)
        start = time.perf_counter()
        coefs, paths = {}, {}
        for dim in sorted({r["D"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["D"] == dim]
            X = torch.stack([rows[i]["x"] for i in idx])
            res = fit_sindy_cv(X, t, lib, WeakForm(**weak_kw), STLSQ(alpha="auto", **opt_kw), **kw)
            for j, i in enumerate(idx):
                coefs[i], paths[i] = res.coefficients[j], res.path[:, j]
        wall = time.perf_counter() - start
        cells = []
        for noise in D.NOISES:
            ids = [i for i, r in enumerate(rows) if r["noise"] == noise]
            ex = np.mean([bool(metrics.exact_recovery(coefs[i].double(), rows[i]["true"])) for i in ids])
            ce = np.mean([bool(metrics.exact_recovery(paths[i].double(), rows[i]["true"].expand(paths[i].shape)).any())
                          for i in ids])
            cells.append(f"{100 * ex:.1f} ({100 * ce:.1f})")
        print(f"{name:<14}" + "".join(f"{c:>22}" for c in cells) + f"{wall:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
