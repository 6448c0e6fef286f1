"""SDE and CDE benchmark: torchmech.de against torchsde and torchcde, both sides in one process.

Workloads:

1. Brownian queries: ``--queries`` (1000) sequential increments ``W(t_i, t_{i+1})`` over [0, 1] of a
   Brownian motion of shape (``--bm-batch`` 1024, ``--bm-dim`` 32), the motion built inside the timed
   call. torchmech ``BrownianInterval`` against torchsde ``BrownianInterval`` (as ``sdeint`` builds
   it, and with the ``dt`` hint a user can pass), torchmech ``VirtualBrownianTree`` against torchsde
   ``BrownianTree`` (its constant-memory tree) at the same tolerance ``--tree-tol``.
2. Neural SDE training step: diagonal noise, state ``--sde-state`` (32), batch ``--sde-batch``
   (1024), ``--sde-steps`` (200) fixed steps over [0, 1], 11 save times, loss = mean squared error
   against a fixed target, forward + backward. Drift MLP d-W-W-d tanh, diffusion MLP d-W-W-d tanh
   with a sigmoid output (W = ``--sde-width``, 64); both sides use the same modules (same weights).
   a) Reversible Heun with torchmech's ``ReversibleAdjoint`` (native ``solve`` and the torchsde-style
      ``torchmech.sdeint_adjoint``) against ``torchsde.sdeint_adjoint(method="reversible_heun",
      adjoint_method="adjoint_reversible_heun")``;
   b) Euler-Maruyama with direct backpropagation (native ``solve`` + ``DirectAdjoint`` and
      ``torchmech.sdeint``) against ``torchsde.sdeint(method="euler")``.
   c) Stratonovich midpoint with the stochastic adjoint (``sdeint_adjoint(method="midpoint")``, the
      adjoint SDE solved backwards on the same Brownian path) on both sides.
   d) SRA1 (``method="srk"``), additive noise: the same drift, a diffusion ``(B, d, d)`` that is a
      learnable function of t alone; torchsde with the Brownian motion ``sdeint`` builds and with a
      ``BrownianInterval(dt=dt)``.
   Each side draws its own Brownian motion (a ``BrownianInterval``, built inside the step).
3. Neural CDE training step on noisy 2-d spirals (half clockwise), batch ``--cde-batch`` (256),
   ``--cde-obs`` (100) observations of (t, x, y), hidden ``--cde-hidden`` (32); func MLP
   hidden-128-hidden*3 (relu, tanh), z0 and a logistic readout linear; loss = binary cross entropy
   of the final state's readout. The interpolation coefficients of the whole batch are computed once
   (timed separately) and the training step builds the path from them. Cases: natural cubic and
   Hermite (backward differences) coefficients with RK4 (step = observation spacing) and direct
   backpropagation; natural cubic with Dopri5 (rtol 1e-4, atol 1e-6, no jump times on either side)
   and the backsolve adjoint with seminorms (torchcde passes ``adjoint_options={"norm":
   "seminorm"}`` to torchdiffeq).

Reported per case: wall time = median of ``--repeat`` runs after one warm-up run (timed runs of all
cases of a table go round-robin, so load from other processes spreads over every case); peak
memory = the largest amount of tensor memory allocated during one call beyond what was allocated
when it started (CPU: sum of the allocation/free records of torch's CPU allocator in the order the
profiler saw them, ``torch.profiler`` with ``profile_memory=True``, in a separate untimed call;
CUDA: ``torch.cuda.max_memory_allocated``). Python objects (e.g. torchsde's tree of intervals) are
not counted, only tensors. Ratios are peer time / ours (> 1: ours faster) and ours memory / peer
memory (<= 1: ours no larger). The goals checked: at least 2x faster than the peer with equal or
lower peak memory, per workload, against the best peer variant. After the SDE and CDE tables, the
"vector-field floor" is the time the networks alone take for the evaluations each method needs
(standalone forward / forward+backward calls at the same batch times the call counts): what no
implementation of that method can go below, which bounds the speed-up that is possible.

    .venv/bin/python benchmarks/sde_cde.py                  # everything, float32, CPU, 1 thread
    .venv/bin/python benchmarks/sde_cde.py --quick          # smaller sizes, fewer repeats
    .venv/bin/python benchmarks/sde_cde.py --only sde --sde-steps 100
    .venv/bin/python benchmarks/sde_cde.py --device cuda --threads 0

Peers are optional: a missing torchsde or torchcde is reported and its column skipped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import torchmech
import torchmech.de as de
from torchmech.compat import torchcde as mcde

try:
    import torchsde
except ImportError:  # pragma: no cover - optional peer
    torchsde = None
try:
    import torchcde
except ImportError:  # pragma: no cover - optional peer
    torchcde = None

T_START = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T_START:6.0f}s] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn, device):
    """(bytes, result): largest tensor memory allocated during ``fn()`` beyond the level at its start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    cur = best = 0
    for _, n in records:
        cur += n
        best = max(best, cur)
    return best, out


class Bench:
    """Cases of one table: warm-up and memory run when added, timed runs round-robin in ``run``."""

    def __init__(self, device, memory=True):
        self.device, self.memory = device, memory
        self.cases = []

    def add(self, side, name, fn, info=None, reset=None, memory=True):
        """Register ``fn`` as a case of ``side`` ("ours"/"peer"); a failure is recorded, not raised.

        ``reset`` (e.g. dropping parameter gradients) runs before the memory run, so that memory
        freed by the call but allocated before it is not part of the measurement.
        """
        case = {"side": side, "name": name, "fn": fn, "times": [], "info": info or {}, "error": None}
        try:
            sync(self.device)
            t0 = time.perf_counter()
            case["out"] = fn()
            sync(self.device)
            case["warm"] = time.perf_counter() - t0
            if self.memory and memory:
                case["out"] = None
                if reset is not None:
                    reset()
                case["peak"], _ = peak_memory(fn, self.device)
        except Exception as exc:  # noqa: BLE001
            case["error"] = f"{type(exc).__name__}: {exc}"[:160]
            log(f"  {name}: FAILED {case['error']}")
        else:
            log(f"  {name}: warm-up {fmt_t(case['warm'])}"
                + (f", peak {case['peak'] / 2 ** 20:.1f} MB" if "peak" in case else ""))
        self.cases.append(case)
        return case

    def run(self, repeat):
        live = [c for c in self.cases if c["error"] is None]
        for r in range(repeat):
            for case in live:
                sync(self.device)
                t0 = time.perf_counter()
                case["fn"]()
                sync(self.device)
                case["times"].append(time.perf_counter() - t0)
            log(f"  timed round {r + 1}/{repeat} done")
        for case in live:
            case["med"] = statistics.median(case["times"])


def fmt_t(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_mb(b):
    if b is None:
        return "-"
    mb = b / 2 ** 20
    return f"{mb:.0f} MB" if mb >= 100 else f"{mb:.1f} MB"


def table(title, bench, groups, goals):
    """Print the cases and, per group (ours case, peer cases), the ratios against the best peer.

    ``groups``: list of (label, ours case names, peer case names); the fastest of each side counts.
    """
    print(f"\n{title}\n")
    print("| side | case | warm-up | time | peak memory |")
    print("|---|---|---|---|---|")
    for c in bench.cases:
        if c["error"]:
            print(f"| {c['side']} | {c['name']} | - | - | {c['error']} |")
            continue
        extra = "".join(f"; {k} {v}" for k, v in c["info"].items())
        print(f"| {c['side']} | {c['name']} | {fmt_t(c['warm'])} | {fmt_t(c['med'])} | "
              f"{fmt_mb(c.get('peak'))}{extra} |")
    by = {c["name"]: c for c in bench.cases if c["error"] is None}
    print("\n| workload | ours (fastest) | peer (fastest) | speed-up | memory ours/peer "
          "| goal: >= 2x and <= 1x memory |")
    print("|---|---|---|---|---|---|")
    for label, ours, peers in groups:
        o = [by[n] for n in ours if n in by]
        p = [by[n] for n in peers if n in by]
        if not o:
            print(f"| {label} | failed | - | - | - | - |")
            continue
        bo = min(o, key=lambda c: c["med"])
        if not p:
            print(f"| {label} | {bo['name']} {fmt_t(bo['med'])} | skipped (peer missing or failed) | - | - | - |")
            continue
        bp = min(p, key=lambda c: c["med"])
        speed = bp["med"] / bo["med"]
        mem = bo["peak"] / bp["peak"] if bo.get("peak") is not None and bp.get("peak") else None
        fast_ok = speed >= 2.0
        if mem is None:  # memory not measured (--no-memory, or no peak for one side): speed decides alone
            verdict = ("met" if fast_ok else "missed (speed)") + ", memory not measured"
        else:
            mem_ok = bo["peak"] <= bp["peak"]
            verdict = ("met" if fast_ok and mem_ok else
                       "missed (" + ", ".join(x for x, ok in (("speed", fast_ok), ("memory", mem_ok)) if not ok) + ")")
        goals.append((label, verdict))
        print(f"| {label} | {bo['name']} {fmt_t(bo['med'])} | {bp['name']} {fmt_t(bp['med'])} | {speed:.2f}x | "
              f"{'-' if mem is None else f'{mem:.2f}'} | {verdict} |")


# -- 1. Brownian queries ---------------------------------------------------------------------------

def brownian_runs(args, device, dtype, goals):
    B, D, N = args.bm_batch, args.bm_dim, args.queries
    grid = torch.linspace(0, 1, N + 1, dtype=torch.float64).tolist()
    pairs = list(zip(grid[:-1], grid[1:]))
    tol = args.tree_tol
    log(f"brownian: {N} sequential queries, shape ({B}, {D}), tree tol {tol:g}")

    def queries(make):
        def run():
            bm = make()
            out = None
            for a, b in pairs:
                out = bm(a, b)
            return out
        return run

    bench = Bench(device, memory=not args.no_memory)
    bench.add("ours", "torchmech BrownianInterval",
              queries(lambda: de.BrownianInterval(0.0, 1.0, (B, D), dtype=dtype, device=device, seed=0)))
    bench.add("ours", f"torchmech VirtualBrownianTree(tol={tol:g})",
              queries(lambda: de.VirtualBrownianTree(0.0, 1.0, (B, D), tol=tol, dtype=dtype, device=device,
                                                     seed=0)))
    if torchsde is not None:
        bench.add("peer", "torchsde BrownianInterval",
                  queries(lambda: torchsde.BrownianInterval(0.0, 1.0, size=(B, D), dtype=dtype, device=device,
                                                            entropy=0)))
        bench.add("peer", "torchsde BrownianInterval(dt=1/N)",
                  queries(lambda: torchsde.BrownianInterval(0.0, 1.0, size=(B, D), dtype=dtype, device=device,
                                                            entropy=0, dt=1.0 / N)))
        bench.add("peer", f"torchsde BrownianTree(tol={tol:g})",
                  queries(lambda: torchsde.BrownianTree(0.0, torch.zeros(B, D, dtype=dtype, device=device), t1=1.0,
                                                        entropy=0, tol=tol)))
    else:
        log("brownian: torchsde not installed, peer column skipped")
    bench.run(args.repeat)
    table(f"Brownian queries: {N} sequential increments over [0, 1], shape ({B}, {D}), {args.dtype} "
          f"(motion built inside the call)", bench,
          [("BrownianInterval", ["torchmech BrownianInterval"],
            ["torchsde BrownianInterval", "torchsde BrownianInterval(dt=1/N)"]),
           ("VirtualBrownianTree vs BrownianTree", [f"torchmech VirtualBrownianTree(tol={tol:g})"],
            [f"torchsde BrownianTree(tol={tol:g})"])], goals)


# -- 2. Neural SDE training step --------------------------------------------------------------------

def mlp(d, w, out_act=None):
    layers = [torch.nn.Linear(d, w), torch.nn.Tanh(), torch.nn.Linear(w, w), torch.nn.Tanh(), torch.nn.Linear(w, d)]
    if out_act is not None:
        layers.append(out_act)
    return torch.nn.Sequential(*layers)


class VF(torch.nn.Module):
    """``f(t, y, args) = net(y)`` for torchmech's terms (a module, so adjoints find its parameters)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y, args=None):
        return self.net(y)


class PeerSDE(torch.nn.Module):
    """torchsde-style module: ``f(t, y)``, ``g(t, y)`` over the shared drift and diffusion networks."""

    noise_type = "diagonal"

    def __init__(self, drift, diffusion, sde_type):
        super().__init__()
        self.drift, self.diffusion, self.sde_type = drift, diffusion, sde_type

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return self.diffusion(y)


class AdditiveSDE(torch.nn.Module):
    """torchsde-style additive-noise SDE: drift ``net(y)``, diffusion ``(B, d, d)`` depending on t only."""

    noise_type = "additive"
    sde_type = "ito"

    def __init__(self, drift, d):
        super().__init__()
        self.drift = drift
        self.noise = torch.nn.Linear(1, d * d)
        self.d = d

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device).reshape(1, 1)
        sigma = 0.3 * torch.tanh(self.noise(t)).reshape(1, self.d, self.d)
        return sigma.expand(y.shape[0], self.d, self.d)


def floor_fn(plan):
    """A case running only the vector-field calls of a method: ``plan`` = [(count, fn), ...]."""
    def run():
        for n, fn in plan:
            for _ in range(n):
                fn()
    return run


def floor_note(bench, floor_name, peer_names):
    """The largest speed-up over the peer that the floor (the networks' own time) leaves room for."""
    by = {c["name"]: c for c in bench.cases if c["error"] is None}
    fl = by.get(floor_name)
    peers = [by[n] for n in peer_names if n in by]
    if fl is None or not peers:
        return ""
    best = min(c["med"] for c in peers)
    return f"; the largest speed-up over the peer this floor leaves room for is {best / fl['med']:.2f}x"


def add_peer_with_dt_hint(bench, name, step, reset, solve, make_bm):
    """Two torchsde cases: ``solve(None)`` (with the Brownian motion sdeint builds) and ``solve(make_bm())``
    (a ``BrownianInterval`` with the ``dt`` hint, built inside the step)."""
    bench.add("peer", name, step(lambda: solve(None)), reset=reset)
    bench.add("peer", f"{name}, BrownianInterval(dt=dt)", step(lambda: solve(make_bm())), reset=reset)


def sde_runs(args, device, dtype, goals):
    torch.manual_seed(0)
    B, d, W, S = args.sde_batch, args.sde_state, args.sde_width, args.sde_steps
    drift = mlp(d, W).to(device=device, dtype=dtype)
    diffusion = mlp(d, W, torch.nn.Sigmoid()).to(device=device, dtype=dtype)
    params = list(drift.parameters()) + list(diffusion.parameters())
    y0 = (0.5 * torch.randn(B, d)).to(device=device, dtype=dtype)
    ts = torch.linspace(0, 1, 11, device=device, dtype=dtype)
    target = torch.randn(11, B, d).to(device=device, dtype=dtype)  # time-first
    dt = 1.0 / S
    log(f"sde: batch {B}, state {d}, MLP width {W}, {S} steps, 11 save times")

    def clear():
        for p in params:
            p.grad = None

    # standalone costs of the vector fields at this batch: the floor any implementation pays
    yq = y0.clone().requires_grad_(True)

    def vf_fwd():
        with torch.no_grad():
            drift(y0), diffusion(y0)

    def vf_fb():
        f, g = drift(yq), diffusion(yq)
        torch.autograd.grad([f, g], [yq] + params, [f, g])


    def step(solve_fn):
        def run():
            clear()
            ys = solve_fn()  # (T, B, d)
            loss = (ys - target).pow(2).mean()
            loss.backward()
            return loss.detach()
        return run

    def ours_native(solver, adjoint):
        def go():
            bm = de.BrownianInterval(0.0, 1.0, (B, d), dtype=dtype, device=device)
            terms = de.MultiTerm(de.ODETerm(VF(drift)), de.DiagonalControlTerm(VF(diffusion), bm))
            sol = de.solve(terms, solver, 0.0, 1.0, y0, dt0=dt, saveat=de.SaveAt(ts=ts),
                           adjoint=adjoint, max_steps=S + 10)
            return sol.ys.transpose(0, 1)
        return go

    strat = PeerSDE(drift, diffusion, "stratonovich")
    ito = PeerSDE(drift, diffusion, "ito")
    rh = Bench(device, memory=not args.no_memory)
    rh.add("ours", "torchmech solve ReversibleHeun + ReversibleAdjoint",
           step(ours_native(de.ReversibleHeun(), de.ReversibleAdjoint())), reset=clear)
    rh.add("ours", "torchmech.sdeint_adjoint reversible_heun",
           step(lambda: torchmech.sdeint_adjoint(strat, y0, ts, method="reversible_heun",
                                                 adjoint_method="adjoint_reversible_heun", dt=dt)), reset=clear)
    if torchsde is not None:
        rh.add("peer", "torchsde sdeint_adjoint reversible_heun",
               step(lambda: torchsde.sdeint_adjoint(strat, y0, ts, method="reversible_heun",
                                                    adjoint_method="adjoint_reversible_heun", dt=dt)), reset=clear)
    else:
        log("sde: torchsde not installed, peer column skipped")
    # torchmech's reversible adjoint: S evaluations in the forward pass, S evaluations with their vjp
    # in the backward pass (torchsde's adjoint_reversible_heun evaluates S more times without a graph)
    rh.add("floor", "vector fields alone: S forward + S forward+backward calls", floor_fn([(S, vf_fwd), (S, vf_fb)]),
           memory=False)
    rh.run(args.repeat)
    table(f"Neural SDE training step, Reversible Heun + reversible adjoint: B={B}, d={d}, diagonal noise, "
          f"MLPs {d}-{W}-{W}-{d}, {S} steps, {args.dtype}", rh,
          [("SDE reversible Heun, adjoint", ["torchmech solve ReversibleHeun + ReversibleAdjoint",
                                             "torchmech.sdeint_adjoint reversible_heun"],
            ["torchsde sdeint_adjoint reversible_heun"])], goals)
    print("\nfloor = the drift and diffusion networks alone, called as often as torchmech's method needs "
          "(standalone calls at the same batch)"
          + floor_note(rh, "vector fields alone: S forward + S forward+backward calls",
                       ["torchsde sdeint_adjoint reversible_heun"]) + ".")

    em = Bench(device, memory=not args.no_memory)
    em.add("ours", "torchmech solve EulerMaruyama + DirectAdjoint",
           step(ours_native(de.EulerMaruyama(), de.DirectAdjoint())), reset=clear)
    em.add("ours", "torchmech.sdeint euler",
           step(lambda: torchmech.sdeint(ito, y0, ts, method="euler", dt=dt)), reset=clear)
    if torchsde is not None:
        em.add("peer", "torchsde sdeint euler",
               step(lambda: torchsde.sdeint(ito, y0, ts, method="euler", dt=dt)), reset=clear)
    em.add("floor", "vector fields alone: S forward+backward calls", floor_fn([(S, vf_fb)]), memory=False)
    em.run(args.repeat)
    table(f"Neural SDE training step, Euler-Maruyama, direct backpropagation: B={B}, d={d}, {S} steps, {args.dtype}",
          em, [("SDE Euler-Maruyama, direct", ["torchmech solve EulerMaruyama + DirectAdjoint",
                                              "torchmech.sdeint euler"], ["torchsde sdeint euler"])], goals)
    print("\nfloor = the networks alone, called as often as Euler-Maruyama with direct backpropagation needs"
          + floor_note(em, "vector fields alone: S forward+backward calls", ["torchsde sdeint euler"]) + ".")

    # torchsde's stochastic adjoint (the adjoint SDE solved backwards on the same path), Stratonovich
    # midpoint both ways, against torchmech.sdeint_adjoint's BacksolveAdjoint
    bs = Bench(device, memory=not args.no_memory)
    bs.add("ours", "torchmech.sdeint_adjoint midpoint",
           step(lambda: torchmech.sdeint_adjoint(strat, y0, ts, method="midpoint", dt=dt)), reset=clear)
    if torchsde is not None:
        add_peer_with_dt_hint(bs, "torchsde sdeint_adjoint midpoint", step, clear,
                              lambda bm: torchsde.sdeint_adjoint(strat, y0, ts, method="midpoint", dt=dt, bm=bm),
                              lambda: torchsde.BrownianInterval(0.0, 1.0, (B, d), dtype=dtype, device=device, dt=dt))
    bs.run(args.repeat)
    table(f"Neural SDE training step, midpoint + stochastic (backsolve) adjoint: B={B}, d={d}, diagonal noise, "
          f"{S} steps, {args.dtype}", bs,
          [("SDE midpoint, backsolve adjoint", ["torchmech.sdeint_adjoint midpoint"],
            ["torchsde sdeint_adjoint midpoint", "torchsde sdeint_adjoint midpoint, BrownianInterval(dt=dt)"])],
          goals)

    # SRA1 (torchsde's "srk" for additive noise): drift MLP, a learnable diffusion of t alone, each
    # side's Brownian motion with the space-time Levy area, built inside the step
    additive = AdditiveSDE(drift, d).to(device=device, dtype=dtype)
    params_add = params + list(additive.noise.parameters())

    def clear_add():
        for p in params_add:
            p.grad = None

    def srk_step(solve_fn):
        def run():
            clear_add()
            loss = (solve_fn() - target).pow(2).mean()
            loss.backward()
            return loss.detach()
        return run

    def srk_bench(sde, ours_name, step_fn, reset, title, workload):
        """torchmech.sdeint(method="srk") against torchsde's, each side's Brownian motion with the space-time
        Levy area built inside the step."""
        bench = Bench(device, memory=not args.no_memory)
        bench.add("ours", ours_name, step_fn(lambda: torchmech.sdeint(sde, y0, ts, method="srk", dt=dt)), reset=reset)
        if torchsde is not None:
            add_peer_with_dt_hint(bench, "torchsde sdeint srk", step_fn, reset,
                                  lambda bm: torchsde.sdeint(sde, y0, ts, method="srk", dt=dt, bm=bm),
                                  lambda: torchsde.BrownianInterval(0.0, 1.0, (B, d), dtype=dtype, device=device,
                                                                    dt=dt, levy_area_approximation="space-time"))
        bench.run(args.repeat)
        table(title, bench, [(workload, [ours_name],
                              ["torchsde sdeint srk", "torchsde sdeint srk, BrownianInterval(dt=dt)"])], goals)

    srk_bench(additive, "torchmech.sdeint srk", srk_step, clear_add,
              f"Neural SDE training step, SRA1 (srk), additive noise (diffusion a learnable function of t, d x d), "
              f"direct backpropagation: B={B}, d={d}, {S} steps, {args.dtype}", "SDE SRA1, direct")
    # SRI2 (torchsde's "srk" for diagonal noise, and its default method for Ito SDEs): the diagonal-noise networks
    srk_bench(ito, "torchmech.sdeint srk (SRI2)", step, clear,
              f"Neural SDE training step, SRI2 (srk), diagonal noise, direct backpropagation: B={B}, d={d}, {S} steps, "
              f"{args.dtype}", "SDE SRI2, direct")

    # Adaptive steps. torchsde (and torchmech.sdeint since the step-doubling change) estimates a step's error
    # by one full step against two half steps, with one step size for the whole batch.
    ad = Bench(device, memory=not args.no_memory)
    tol = args.sde_tol
    ad.add("ours", "torchmech.sdeint midpoint, adaptive",
           step(lambda: torchmech.sdeint(strat, y0, ts, method="midpoint", dt=0.05, adaptive=True, rtol=tol,
                                         atol=tol, dt_min=1e-4)), reset=clear)
    if torchsde is not None:
        ad.add("peer", "torchsde sdeint midpoint, adaptive",
               step(lambda: torchsde.sdeint(strat, y0, ts, method="midpoint", dt=0.05, adaptive=True, rtol=tol,
                                            atol=tol, dt_min=1e-4)), reset=clear)
    ad.run(args.repeat)
    table(f"Neural SDE training step, midpoint with adaptive steps (rtol = atol = {tol:g}, dt0 = 0.05), direct "
          f"backpropagation: B={B}, d={d}, {args.dtype}", ad,
          [("SDE midpoint, adaptive", ["torchmech.sdeint midpoint, adaptive"],
            ["torchsde sdeint midpoint, adaptive"])], goals)


# -- 3. Neural CDE training step --------------------------------------------------------------------

def spirals(B, T, gen):
    """(t (T,), x (B, T, 3) with channels (t, x, y), labels (B,)): noisy decaying spirals, half clockwise."""
    t = torch.linspace(0, 4 * math.pi, T, dtype=torch.float64)
    start = torch.rand(B, generator=gen, dtype=torch.float64) * 2 * math.pi
    r = 1.0 / (1.0 + 0.5 * t)
    xp = r * torch.cos(start[:, None] + t)
    yp = r * torch.sin(start[:, None] + t)
    labels = (torch.arange(B) % 2).to(torch.float64)
    yp = torch.where(labels[:, None] > 0, -yp, yp)  # mirrored: clockwise
    x = torch.stack([t.expand(B, T), xp, yp], dim=-1)
    x[..., 1:] += 0.05 * torch.randn(B, T, 2, generator=gen, dtype=torch.float64)
    return t, x, labels


class CDEFunc(torch.nn.Module):
    def __init__(self, hidden, channels, count):
        super().__init__()
        self.hidden, self.channels, self.count = hidden, channels, count
        self.l1 = torch.nn.Linear(hidden, 128)
        self.l2 = torch.nn.Linear(128, hidden * channels)

    def forward(self, t, z):
        self.count[0 if torch.is_grad_enabled() else 1] += 1
        return torch.tanh(self.l2(torch.relu(self.l1(z)))).view(z.shape[0], self.hidden, self.channels)


def cde_runs(args, device, dtype, goals):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    B, T, H = args.cde_batch, args.cde_obs, args.cde_hidden
    t, x, labels = spirals(B, T, gen)
    t, x, labels = (v.to(device=device, dtype=dtype) for v in (t, x, labels))
    C = x.shape[-1]
    count = [0, 0]  # calls with / without autograd recording
    func = CDEFunc(H, C, count).to(device=device, dtype=dtype)
    init = torch.nn.Linear(C, H).to(device=device, dtype=dtype)
    readout = torch.nn.Linear(H, 1).to(device=device, dtype=dtype)
    params = list(func.parameters()) + list(init.parameters()) + list(readout.parameters())
    fparams = list(func.parameters())
    h = float(t[1] - t[0])
    log(f"cde: spirals batch {B}, {T} observations, hidden {H}, channels {C}")

    def clear():
        for p in params:
            p.grad = None

    zq = torch.randn(B, H, device=device, dtype=dtype, requires_grad=True)
    dXq = torch.randn(B, C, 1, device=device, dtype=dtype)

    def f_fwd():
        with torch.no_grad():
            func(None, zq) @ dXq

    def f_fb():
        out = func(None, zq) @ dXq
        torch.autograd.grad(out, [zq] + fparams, out)


    coef = Bench(device, memory=not args.no_memory)
    coef.add("ours", "torchmech natural_cubic_coeffs", lambda: mcde.natural_cubic_coeffs(x, t))
    coef.add("ours", "torchmech hermite coefficients",
             lambda: mcde.hermite_cubic_coefficients_with_backward_differences(x, t))
    if torchcde is not None:
        coef.add("peer", "torchcde natural_cubic_coeffs", lambda: torchcde.natural_cubic_coeffs(x, t))
        coef.add("peer", "torchcde hermite coefficients",
                 lambda: torchcde.hermite_cubic_coefficients_with_backward_differences(x, t))
    else:
        log("cde: torchcde not installed, peer column skipped")
    coef.run(args.repeat)
    ours_coeffs = {"natural": mcde.natural_cubic_coeffs(x, t),
                   "hermite": mcde.hermite_cubic_coefficients_with_backward_differences(x, t)}
    peer_coeffs = {} if torchcde is None else {
        "natural": torchcde.natural_cubic_coeffs(x, t),
        "hermite": torchcde.hermite_cubic_coefficients_with_backward_differences(x, t)}

    def step(make_X, cdeint, **kw):
        def run():
            clear()
            X = make_X()
            z0 = init(X.evaluate(float(t[0])))
            zT = cdeint(X, func, z0, t[[0, -1]], **kw)[:, -1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(readout(zT)[:, 0], labels)
            loss.backward()
            return loss.detach()
        return run

    def counted(case_fn):
        count[0] = count[1] = 0
        case_fn()
        return tuple(count)

    configs = [
        ("natural cubic, RK4, direct", "natural", dict(adjoint=False, method="rk4", options={"step_size": h}),
         dict(adjoint=False, method="rk4", options={"step_size": h})),
        ("Hermite, RK4, direct", "hermite", dict(adjoint=False, method="rk4", options={"step_size": h}),
         dict(adjoint=False, method="rk4", options={"step_size": h})),
        ("natural cubic, Dopri5, backsolve adjoint", "natural",
         dict(adjoint=True, method="dopri5", rtol=1e-4, atol=1e-6, options={"jump_t": t[:0]}),
         dict(adjoint=True, method="dopri5", rtol=1e-4, atol=1e-6, adjoint_options={"norm": "seminorm"},
              adjoint_params=tuple(fparams))),
    ]
    # further torchmech variants of a config, in the same comparison group: shared steps (the batch
    # steps together, as torchcde steps it) next to the default per-sample steps
    variants = {"natural cubic, Dopri5, backsolve adjoint": [
        ("natural cubic, Dopri5, backsolve adjoint, shared steps", dict(norm=de.batch_rms_norm))]}
    bench = Bench(device, memory=not args.no_memory)
    groups = []
    floors = []
    floor_labels = []
    for label, kind, kw_ours, kw_peer in configs:
        co = ours_coeffs[kind]
        names_o = []
        for label_o, kw in [(label, {})] + variants.get(label, []):
            fn = step(lambda co=co: mcde.CubicSpline(co, t), torchmech.cdeint, **kw_ours, **kw)
            calls = counted(fn)
            bench.add("ours", f"torchmech {label_o}", fn,
                      info={"func calls (graph/no graph)": f"{calls[0]}/{calls[1]}"}, reset=clear)
            floors.append((f"torchmech {label_o}", calls))
            names_o.append((label_o, calls))
        names_p = []
        if torchcde is not None:
            cp = peer_coeffs[kind]
            fn = step(lambda cp=cp: torchcde.CubicSpline(cp, t), torchcde.cdeint, **kw_peer)
            calls = counted(fn)
            bench.add("peer", f"torchcde {label}", fn,
                      info={"func calls (graph/no graph)": f"{calls[0]}/{calls[1]}"}, reset=clear)
            floors.append((f"torchcde {label}", calls))
            names_p.append(f"torchcde {label}")
        groups.append((f"CDE {label}", [f"torchmech {lo}" for lo, _ in names_o], names_p))
        for label_o, (g, ng) in names_o:  # torchmech's call counts
            bench.add("floor", f"func alone: torchmech {label_o} calls", floor_fn([(g, f_fb), (ng, f_fwd)]),
                      info={"calls (graph/no graph)": f"{g}/{ng}"}, memory=False)
            floor_labels.append((label_o, label))
    count[0] = count[1] = 0
    bench.run(args.repeat)
    table(f"Interpolation coefficients of the whole batch ({B}, {T}, {C}), {args.dtype}", coef,
          [("natural cubic coefficients", ["torchmech natural_cubic_coeffs"], ["torchcde natural_cubic_coeffs"]),
           ("Hermite coefficients", ["torchmech hermite coefficients"], ["torchcde hermite coefficients"])], [])
    table(f"Neural CDE training step, spirals: B={B}, {T} observations, hidden {H}, func {H}-128-{H}x{C}, "
          f"{args.dtype}", bench, groups, goals)
    print("\nfloor = func alone (standalone calls at the same batch: forward+backward for calls made while "
          "recording a graph, forward for the others), as often as torchmech's solve called it")
    for label_o, label in floor_labels:
        note = floor_note(bench, f"func alone: torchmech {label_o} calls", [f"torchcde {label}"])
        print(f"- {label_o}" + (":" + note[1:] if note else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=5, help="timed runs per case after the warm-up (median)")
    p.add_argument("--quick", action="store_true",
                   help="3 repeats, 300 queries, 50 SDE steps, 50 CDE observations (sizes otherwise as given)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for every case (default 1: steadier on a shared machine; "
                        "0 = torch's default)")
    p.add_argument("--only", choices=["brownian", "sde", "cde"], default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the (profiled) peak-memory runs")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--bm-batch", type=int, default=1024)
    p.add_argument("--bm-dim", type=int, default=32)
    p.add_argument("--tree-tol", type=float, default=1e-5)
    p.add_argument("--sde-batch", type=int, default=1024)
    p.add_argument("--sde-state", type=int, default=32)
    p.add_argument("--sde-width", type=int, default=64)
    p.add_argument("--sde-steps", type=int, default=200)
    p.add_argument("--sde-tol", type=float, default=1e-3, help="rtol = atol of the adaptive SDE case")
    p.add_argument("--cde-batch", type=int, default=256)
    p.add_argument("--cde-obs", type=int, default=100)
    p.add_argument("--cde-hidden", type=int, default=32)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeat = min(args.repeat, 3)
        args.queries = min(args.queries, 300)
        args.sde_steps = min(args.sde_steps, 50)
        args.cde_obs = min(args.cde_obs, 50)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load = "?"
    print(f"device {device}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {torch.multiprocessing.cpu_count()}, load average at start {load}, "
          f"torchsde {getattr(torchsde, '__version__', 'missing')}, "
          f"torchcde {getattr(torchcde, '__version__', 'missing')}; "
          f"median of {args.repeat} after 1 warm-up")
    if torchsde is None:
        print("torchsde is not installed: its columns are skipped (pip install torchsde)")
    if torchcde is None:
        print("torchcde is not installed: its columns are skipped (pip install torchcde)")
    goals: list = []
    if args.only in (None, "brownian"):
        brownian_runs(args, device, dtype, goals)
    if args.only in (None, "sde"):
        sde_runs(args, device, dtype, goals)
    if args.only in (None, "cde"):
        cde_runs(args, device, dtype, goals)
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load = "?"
    print(f"\nGoals (>= 2x faster than the fastest peer variant, peak memory <= the peer's), "
          f"load average at end {load}:")
    for label, verdict in goals:
        print(f"- {label}: {verdict}")
    print(f"Total wall time {time.perf_counter() - T_START:.0f} s")


if __name__ == "__main__":
    main()
