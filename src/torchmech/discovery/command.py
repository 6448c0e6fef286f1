"""`torchmech discover`: trajectories in, governing equations out (SINDy and MNN-based discovery)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from torchmech.discovery.base import format_equations
from torchmech.mnn.linalg.blocktri import FactorizationError

LIBRARIES = ("poly2", "poly3", "poly3+fourier")
DEFAULT_SYSTEM = "lorenz"


def make_library(name: str):
    from torchmech.discovery.library import FourierLibrary, PolynomialLibrary

    if name == "poly2":
        return PolynomialLibrary(degree=2)
    if name == "poly3":
        return PolynomialLibrary(degree=3)
    if name == "poly3+fourier":
        return PolynomialLibrary(degree=3) + FourierLibrary(n_frequencies=1)
    raise ValueError(f"--library must be one of {LIBRARIES}, got {name!r}")


def _threshold(value: str):
    if value == "cv":
        return value
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'cv', got {value!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'cv', got {value!r}")
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="*", metavar="DATA",
                   help="CSV (time column 't' or 'time', one column per variable, optional 'trajectory' id "
                        "column) or NPZ ('t', 'x') files; none: simulate --system (default: Lorenz)")
    p.add_argument("--system", default=None, help="a registered system to simulate (see --list-systems); "
                   "with DATA, its equations are the ground truth to compare with")
    p.add_argument("--list-systems", action="store_true", help="print the registered system names and exit")
    p.add_argument("--noise", type=float, default=0.01,
                   help="noise added to simulated data, as a fraction of each variable's std (default 0.01)")
    p.add_argument("--method", choices=["sindy", "mnn", "both"], default="both")
    p.add_argument("--library", choices=LIBRARIES, default="poly2")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help="coefficient magnitude below which terms are removed (default 0.5 for MNN, 0.2 for SINDy), "
                        "in the data's units (coefficients are rates per time unit: with time in units 1000x "
                        "longer, scale it 1000x), or 'cv': SINDy chooses each equation's terms by blocked "
                        "cross-validation (candidate supports, one-standard-error rule; no threshold to guess), "
                        "MNN keeps 0.5")
    p.add_argument("--samples", type=int, default=1000, help="samples of simulated data (default 1000)")
    p.add_argument("--out", default="discover-output", help="folder for report.json and the plot")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-column", default=None, help="name of the time column in CSV input")
    p.add_argument("--id-column", default=None, help="name of the trajectory-id column in CSV input (numeric ids; "
                   "default: a column named 'trajectory', 'traj', 'id' or 'trajectory_id'; 'none': no id column)")
    p.add_argument("--quick", action="store_true", help="a reduced budget (for tests and smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _Fail(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _r2(pred: torch.Tensor, true: torch.Tensor) -> float:
    ss_res = (pred - true).square().sum()
    ss_tot = (true - true.mean(0)).square().sum()
    return float(1 - ss_res / ss_tot)


def _simulate_model(coefficients: torch.Tensor, library, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Integrate x' = coefficients @ library(x) from y0 (D,) over t (T,). Returns (T, D) and success."""
    from torchmech import de

    def f(_t, y, _args):
        return library.transform(y) @ coefficients.T

    sol = de.solve(de.ODETerm(f), de.Dopri5(), t[0], t[-1], y0[None], saveat=de.SaveAt(ts=t),
                   controller=de.PIDController(rtol=1e-8, atol=1e-8), max_steps=100_000, throw=False)
    return sol.ys[0], bool(sol.success.all()) and bool(torch.isfinite(sol.ys).all())


def _support_metrics(found: torch.Tensor, true: torch.Tensor) -> dict:
    f, t = found != 0, true != 0
    tp = int((f & t).sum())
    precision = tp / max(int(f.sum()), 1)
    recall = tp / max(int(t.sum()), 1)
    rel = ((found - true).abs() / true.abs())[t]
    return dict(precision=precision, recall=recall, exact=bool((f == t).all()),
                median_rel_error=float(rel.median()), max_rel_error=float(rel.max()))


def _fit(method: str, library, ts, xs, threshold, quick: bool, progress: bool) -> torch.Tensor:
    """Coefficients (D, F) of x' = C library(x); threshold a number, or "cv" (SINDy only)."""
    if method == "sindy":
        from torchmech.discovery.differentiation import WeakForm
        from torchmech.discovery.optimizers import STLSQ
        from torchmech.discovery.sindy import SINDy, fit_sindy_cv

        # Weak form + noise-adaptive ridge: the most reliable SINDy variant in benchmarks/discovery.py.
        weak = WeakForm.fitting(min(x.shape[0] for x in xs),
                                min_rows=2 * library.n_features(xs[0].shape[-1]) // len(xs))
        if threshold == "cv":
            return fit_sindy_cv(list(xs), list(ts), library, weak, STLSQ(alpha="auto", prior_scale=_prior_scale(xs, ts)),
                                search="support").coefficients[0].detach()
        # the ridge prior in the threshold's units: a threshold of 50 (say, time in ms) means coefficients of
        # hundreds, which a prior of standard deviation 1 would shrink (it is 1 up to the default 0.2)
        optimizer = STLSQ(threshold=threshold, alpha="auto", prior_scale=max(1.0, 5.0 * threshold))
        model = SINDy(library=library, differentiation=weak, optimizer=optimizer)
        model.fit(xs if len(xs) > 1 else xs[0], ts if len(ts) > 1 else ts[0])
        return model.coefficients_.detach()
    from torchmech.discovery.mechanistic import MechanisticDiscovery

    model = MechanisticDiscovery(library, threshold=threshold, cycles=3 if quick else 5, progress=progress)
    return model.fit(xs, ts).coefficients_.detach()


def _prior_scale(xs, ts) -> float:
    """The ridge prior's standard deviation for a fit with no threshold to take units from: 1 (as for the
    default threshold), or a tenth of the data's fastest rate, max over variables of RMS(dx/dt) / RMS(x)
    (finite differences), when that is larger: the prior must not shrink the coefficients of data whose time
    unit makes the rates large (rates of ~1e3, time in ms). Standard benchmark systems stay at 1 (Lorenz: 0.7)."""
    rate = 0.0
    for x, t in zip(xs, ts):
        dx = (x[1:] - x[:-1]) / (t[1:] - t[:-1])[:, None]
        rate = max(rate, float((dx.square().mean(0).sqrt() / x.square().mean(0).sqrt().clamp_min(1e-300)).max()))
    return max(1.0, 0.1 * rate)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Fail as exc:
        print(f"torchmech discover: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad input reported by the library, with its own message
        print(f"torchmech discover: error: {exc}", file=sys.stderr)
        return 2
    except (FactorizationError, torch.linalg.LinAlgError) as exc:  # the fit's linear algebra broke down
        print(f"torchmech discover: error: the fit's linear algebra failed on this data ({exc}); values or times "
              "of extreme magnitude (e.g. 1e60, or times in units of 1e-12) need rescaling", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from torchmech import systems
    from torchmech.discovery.data import DataError, load_trajectories

    if args.list_systems:
        print("\n".join(systems.names()))
        return 0
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise _Fail(f"--device {args.device!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise _Fail(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Fail(f"--device {args.device}: CUDA is not available on this machine")
    if not 0 <= args.noise < 10:
        raise _Fail(f"--noise must be a fraction in [0, 10), got {args.noise}")
    window = 32  # the MNN fit's window, and so the shortest series either method is given
    if args.samples < window and not args.data:  # (it only sizes simulated data)
        raise _Fail(f"--samples must be at least {window}, got {args.samples}")
    parent = args.out  # before the fits, not after them: the folder or its nearest existing parent
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise _Fail(f"--out {args.out}: {parent} exists and is not a directory")
    progress = not args.no_progress
    dtype = torch.float64
    library = make_library(args.library)
    system = systems.get(args.system) if args.system else (None if args.data else systems.get(DEFAULT_SYSTEM))

    if args.data:
        try:
            data = load_trajectories(args.data, time_column=args.time_column, id_column=args.id_column,
                                     min_samples=window, dtype=dtype, device=device)
        except DataError as exc:
            raise _Fail(str(exc)) from None
        ts, xs, variables = data.ts, data.xs, data.variables
        F = library.n_features(len(variables))
        rows = sum(x.shape[0] for x in xs)
        if rows < F + 2:
            raise _Fail(f"{data.source}: {rows} samples in all, too few for the {F} features of --library "
                        f"{args.library}")
        source = data.source
        if system is not None and list(system.variables) != variables:
            sv = list(system.variables)
            if sorted(sv) == sorted(variables):  # the same variables in another column order: use the system's
                perm = [variables.index(v) for v in sv]
                xs = [x[:, perm] for x in xs]
                variables = sv
                print(f"note: data columns reordered to the variables of --system {system.name}: {', '.join(sv)}")
            elif len(sv) != len(variables):
                raise _Fail(f"--system {system.name} has {len(sv)} variables, the data has {len(variables)}")
            elif set(sv) & set(variables):
                raise _Fail(f"--system {system.name} has the variables {sv}, the data {variables}: name the data's "
                            "columns as the system's (or all differently, to compare by position)")
            else:
                print(f"note: comparing with --system {system.name} by position: "
                      + ", ".join(f"{a} = {b}" for a, b in zip(variables, sv)))
        # Held out: the last trajectory when there are several.
        if len(xs) > 1:
            held_t, held_x = ts[-1], xs[-1]
            ts, xs = ts[:-1], xs[:-1]
            held_note = "last trajectory of the data (held out from fitting)"
        else:
            held_t, held_x = ts[0], xs[0]
            held_note = "the data's own trajectory (only one was given, so none is held out)"
    else:
        t = torch.linspace(system.t_span[0], system.t_span[1], args.samples, dtype=dtype)
        y0 = system.initial_conditions(dtype=dtype)
        traj = systems.simulate(system, t, y0[0], noise=args.noise, seed=args.seed, dtype=dtype)
        ts, xs, variables = [t.to(device)], [traj.x.to(device)], list(system.variables)
        # Held out: another initial condition, simulated without noise over a quarter of the span.
        y_held = y0[1] if y0.shape[0] > 1 else y0[0] * 1.1
        t_held = torch.linspace(system.t_span[0], system.t_span[0] + 0.25 * (system.t_span[1] - system.t_span[0]),
                                args.samples // 4, dtype=dtype)
        held = systems.simulate(system, t_held, y_held, noise=0.0, dtype=dtype)
        held_t, held_x = t_held.to(device), held.x_clean.to(device)
        source = f"simulated {system.name}, {args.samples} samples on t in {list(system.t_span)}, noise {args.noise:g}"
        held_note = f"clean simulation from the held-out initial condition {y_held.tolist()}"

    names = library.feature_names(variables)
    true = None
    if system is not None:
        try:
            true = system.true_coefficients(library, dtype=dtype).to(device)  # (D, F)
        except ValueError as exc:
            print(f"note: the true equations of {system.name} are not in --library {args.library} ({exc})")

    methods = ["sindy", "mnn"] if args.method == "both" else [args.method]
    print(f"torchmech discover: {source}")
    print(f"library {args.library} ({len(names)} features: {', '.join(names)})")
    report = dict(source=source, variables=variables, library=args.library, features=names, methods={},
                  held_out=held_note)
    if true is not None:
        report["true_equations"] = format_equations(true, names, variables)
        report["true_coefficients"] = true.tolist()
        print("\ntrue equations:")
        for line in report["true_equations"]:
            print("  " + line)
    sims = {}
    for method in methods:
        threshold = args.threshold if args.threshold is not None else (0.5 if method == "mnn" else 0.2)
        if threshold == "cv" and method == "mnn":
            threshold = 0.5
        start = time.perf_counter()
        coef = _fit(method, library, ts, xs, threshold, args.quick, progress)
        seconds = time.perf_counter() - start
        lines = format_equations(coef, names, variables)
        entry = dict(threshold=threshold, seconds=round(seconds, 2), equations=lines, coefficients=coef.tolist())
        chosen = "terms chosen by cross-validation" if threshold == "cv" else f"threshold {threshold:g}"
        print(f"\n{method}: discovered in {seconds:.1f} s ({chosen})")
        for line in lines:
            print("  " + line)
        empty = [v for v, row in zip(variables, coef.tolist()) if not any(row)]
        if empty and threshold != "cv":
            # every term of an equation removed: usually the threshold is at or above its true coefficients
            print(f"  note: every term of {', '.join(v + chr(39) for v in empty)} fell below the threshold "
                  f"{threshold:g}; if these variables do change, try a smaller --threshold or --threshold cv")
        if true is not None:
            m = _support_metrics(coef, true)
            entry["metrics"] = m
            print(f"  support: precision {m['precision']:.2f}, recall {m['recall']:.2f}, "
                  f"{'exact recovery' if m['exact'] else 'NOT exact'}; coefficient error on the true support: "
                  f"median {100 * m['median_rel_error']:.2f}%, max {100 * m['max_rel_error']:.2f}%")
        sim, ok = _simulate_model(coef, library, held_x[0], held_t)
        sims[method] = sim if ok else None
        entry["trajectory_r2"] = _r2(sim, held_x) if ok else None
        r2 = entry["trajectory_r2"]
        print(f"  trajectory R2 ({held_note}): "
              + ("simulation failed (the model diverges)" if not ok else
                 f"{r2:.4f}" if r2 == r2 and abs(r2) != float("inf") else "undefined (the held-out data are constant)"))
        report["methods"][method] = entry

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(_finite(report), fh, indent=2, allow_nan=False)
    _plot(os.path.join(args.out, "discover.png"), held_t, held_x, sims, variables)
    print(f"\nwrote {os.path.join(args.out, 'report.json')} and {os.path.join(args.out, 'discover.png')}")
    return 0


def _finite(obj):
    """The report with NaN/inf numbers as None (null): JSON has no NaN (an R2 is NaN when the held-out data are
    constant)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _plot(path: str, t, x, sims: dict, variables: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    D = len(variables)
    fig, axes = plt.subplots(D, 1, figsize=(8, 1.8 * D + 0.6), sharex=True, squeeze=False)
    t = t.cpu()
    for d, ax in enumerate(axes[:, 0]):
        ax.plot(t, x[:, d].cpu(), color="k", lw=2, label="data")
        for i, (m, sim) in enumerate(sims.items()):
            if sim is not None:
                ax.plot(t, sim[:, d].cpu(), "--", color=f"C{i}", lw=1.5, label=f"discovered ({m})")
        ax.set_ylabel(variables[d])
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("t")
    fig.suptitle("Held-out trajectory: data vs simulation of the discovered equations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
