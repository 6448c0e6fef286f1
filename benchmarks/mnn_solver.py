"""Forward+backward time and peak memory of the NeuRLP solver backends (torchmech.mnn.solve_linear_ode).

Problem (as in issue 2): K = 3 (second order), D = 1, E = 1, T0 = 1, K0 = 2, per-sample per-step random
coefficients with a well-posed leading coefficient (c_2 in [1, 1.5]), random right-hand side and initial values,
per-sample per-step steps h ~ 0.01 * U[1, 1.1]; every input requires grad (learnable steps included). One
measurement = solve_linear_ode(...) followed by backward of a random linear functional of u.

On CPU every configuration runs in its own subprocess so that its peak memory is its own (on CUDA all run in
one process, `--in-process` forces that on CPU too):

* CPU: peak resident-set growth. The child builds its inputs, warms the backend up on a tiny problem (so
  library code pages are already resident), resets the kernel's high-water mark (write "5" to
  /proc/self/clear_refs), notes VmRSS, runs forward+backward once and reads VmHWM. Peak = VmHWM - VmRSS
  before: the memory the solve needs beyond its inputs (outputs and gradients included), as the kernel saw it.
* CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory allocated before.

Timing: wall clock of forward+backward, the first run in the child is a warm-up; the median of the following
`--repeat` runs is reported (fewer repeats when one run takes over 2 s). Combinations predicted (from the
largest smaller one already measured) to take over --skip-over (dense: --dense-skip-over) seconds per run are
skipped and listed; one whose first run exceeds it is reported from that single run, marked "(1 run)".

    .venv/bin/python benchmarks/mnn_solver.py            # full grid, CPU
    .venv/bin/python benchmarks/mnn_solver.py --quick    # B in {1, 64}, T in {100, 1000}
    .venv/bin/python benchmarks/mnn_solver.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

METHODS = ("dense", "banded", "parallel", "lapack", "native", "auto")
K, D, E, T0, K0 = 3, 1, 1, 1, 2
N = D * K


# ----------------------------------------------------------------------------------------------
# Child: one configuration.
# ----------------------------------------------------------------------------------------------

def _problem(B, T, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, T, E, D, K, generator=g, dtype=torch.float64)
    c[..., K - 1] = 1.0 + 0.5 * torch.rand(B, T, E, D, generator=g, dtype=torch.float64)
    rhs = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    init = torch.randn(B, T0, D, K0, generator=g, dtype=torch.float64)
    steps = 0.01 * (1.0 + 0.1 * torch.rand(B, T - 1, generator=g, dtype=torch.float64))
    w = torch.randn(B, T, D, K, generator=g, dtype=torch.float64)
    out = [x.to(dtype=dtype, device=device).requires_grad_() for x in (c, rhs, init, steps)]
    return out, w.to(dtype=dtype, device=device)


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure(method, dtype_name, B, T, device, repeat, threads, skip_over):
    """Forward+backward time and extra peak memory of one configuration (see the module docstring)."""
    import torch
    from torchmech.mnn import solve_linear_ode

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def run(inputs, w):
        for x in inputs:
            x.grad = None
        u = solve_linear_ode(*inputs, method=method)
        (u * w).sum().backward()
        sync()

    # warm-up on a tiny problem: library code paged in, kernels loaded
    run(*_problem(2, 30, dtype, dev, seed=1))
    inputs, w = _problem(B, T, dtype, dev)
    sync()

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    run(inputs, w)
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) if cuda else _status_kb("VmHWM") * 1024) - before

    reps = 0 if first > skip_over else repeat if first < 2.0 else min(repeat, 2)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(inputs, w)
        times.append(time.perf_counter() - t0)
    return {"first": first, "times": times, "peak": peak, "threads": torch.get_num_threads()}


def child(args):
    print(json.dumps(measure(args.method, args.dtype, args.B, args.T, args.device, args.repeat, args.threads,
                             args.skip_over)))


# ----------------------------------------------------------------------------------------------
# Parent: the grid, predictions for skipping, the memory-bandwidth bound, the tables.
# ----------------------------------------------------------------------------------------------

def dense_fits(B, T, itemsize=8):
    """Dense reference: T*n <= 3000 and its matrices (rows ~ 6T x Tn, normal Tn x Tn, Cholesky) in ~4 GB."""
    tn = T * N
    rows = T * E + T0 * D * K0 + 2 * (K - 1) * (T - 1) * D + (T - 2) * D
    return tn <= 3000 and B * (rows * tn + 2 * tn * tn) * itemsize <= 4e9


def predict(results, method, dtype, B, T):
    """Seconds per run predicted from the largest smaller measured configuration of the same method and dtype.

    Extrapolating from the largest one (not the smallest, which is overhead-dominated) keeps it realistic.
    """
    best = None
    for (m, dt, b, t), r in results.items():
        if m != method or dt != dtype or "time" not in r or b > B or t > T or (b, t) == (B, T):
            continue
        if best is None or b * t > best[0]:
            # dense: Python row loops (O(T)) plus O((Tn)^3) algebra; measured ~T^2 between T = 100 and 1000
            best = (b * t, r["time"] * (B / b) * (T / t) ** (2 if method == "dense" else 1))
    return None if best is None else best[1]


def measure_bandwidth(device, threads, nbytes=512 * 2 ** 20, repeat=7):
    """Bytes/s of a large tensor copy (read + write counted)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    src = torch.ones(nbytes // 8, dtype=torch.float64, device=device)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(repeat + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts[1:])


def solve_bytes(B, T, itemsize):
    """Bytes a forward+backward must move at least, in the user's precision.

    inputs (c, rhs, init, steps) read in forward and again in backward; u written; grad_u read; input gradients
    written; normal-matrix blocks (diag, off1, off2 per variable: 3 K x K blocks per step with the central rows)
    written at assembly and read by the factorisation; the factor (same size) written once and read by two
    solves (forward and the implicit backward solve).
    """
    inputs = T * E * D * K + T * E + T0 * D * K0 + (T - 1)
    out = T * D * K
    blocks = 3 * D * K * K * T
    elems = 2 * inputs + out + out + inputs + 2 * blocks + 3 * blocks
    return B * elems * itemsize


def fmt_t(r):
    if r is None:
        return "-"
    if "skip" in r:
        return r["skip"]
    s = f"{r['time'] * 1e3:.1f} ms" if r["time"] < 1 else f"{r['time']:.2f} s"
    return s + " (1 run)" if not r.get("times") else s


def fmt_m(r):
    if r is None or "peak" not in r:
        return "-"
    mb = r["peak"] / 2 ** 20
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}"


def peer_scipy(Bs, Ts, repeat, threads):
    """The outside peer: LAPACK's banded Cholesky (scipy.linalg ``cholesky_banded`` / ``cho_solve_banded``) on the
    same normal equations, one sample at a time, float64, CPU, in this process.

    scipy has no gradients, so it gets the linear algebra of each pass: forward = factor + one solve, forward and
    backward = factor + two solves (the implicit backward's extra solve). The normal matrix is assembled by
    torchmech and copied into LAPACK's upper band storage beforehand (not timed): the peer's times leave out the
    assembly that torchmech's include. torchmech: ``solve_linear_ode(method="parallel")`` without grad (forward)
    and with every input requiring grad (forward + backward of a random functional). Solutions are compared.
    """
    import numpy as np
    import scipy.linalg as sl
    import torch

    from torchmech.mnn import solve_linear_ode
    from torchmech.mnn.system import assemble, prepare

    if threads:
        torch.set_num_threads(threads)

    def med(fn):
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    print("\nPeer: LAPACK banded Cholesky via scipy.linalg (cholesky_banded + cho_solve_banded), one sample at a "
          "time, float64, on the normal equations torchmech assembles (assembly not timed for the peer); "
          f"torchmech parallel with its assembly; median of {repeat} after a warm-up\n")
    print("| B | T | torchmech fwd | scipy fwd: factor+solve (with assembly and band copy) | fwd ratio (with) | "
          "torchmech fwd+bwd | scipy factor+2 solves | fwd+bwd ratio | max rel diff of u |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B in Bs:
        for T in Ts:
            (c, rhs, init, steps), w = _problem(B, T, torch.float64, "cpu")
            inputs = [x.detach() for x in (c, rhs, init, steps)]

            def band():
                """torchmech's assembly, copied into LAPACK's upper band storage: (ab (B, u+1, T n), rhs)."""
                sysm = assemble(prepare(*inputs))
                blocks = [sysm.diag, sysm.off1] + ([sysm.off2] if sysm.off2 is not None else [])
                u = len(blocks) * N - 1  # upper bandwidth in scalars
                ab = np.zeros((B, u + 1, T * N))
                for k, blk in enumerate(blocks):  # block (t, t+k), entry (a, b) -> M[t n + a, (t + k) n + b]
                    blk = blk.detach().numpy()
                    for a in range(N):
                        for b in range(N):
                            if k * N + b >= a:  # upper triangle only
                                ab[:, u + a - k * N - b, k * N + b::N][:, :T - k] = blk[:, :, a, b]
                return ab, sysm.b.detach().reshape(B, T * N).numpy()

            ab, rhs_b = band()
            n = N
            g = w.reshape(B, T * n).numpy()

            def scipy_fwd(two=False):
                for s_ in range(B):
                    cb = sl.cholesky_banded(ab[s_], lower=False, check_finite=False)
                    x = sl.cho_solve_banded((cb, False), rhs_b[s_], check_finite=False)
                    if two:
                        sl.cho_solve_banded((cb, False), g[s_], check_finite=False)
                return x

            def ours_fwd():
                with torch.no_grad():
                    return solve_linear_ode(*inputs, method="parallel")

            leaves = [x.clone().requires_grad_() for x in inputs]

            def ours_fb():
                out = solve_linear_ode(*leaves, method="parallel")
                torch.autograd.grad((out * w).sum(), leaves)

            u_ours = ours_fwd().reshape(B, T * n)[-1].numpy()
            x = scipy_fwd()
            diff = float(np.abs(u_ours - x).max() / np.abs(x).max())
            t_of, t_sf = med(ours_fwd), med(scipy_fwd)
            t_ob, t_sb = med(ours_fb), med(lambda: scipy_fwd(True))
            t_band = med(band)
            print(f"| {B} | {T} | {t_of * 1e3:.2f} ms | {t_sf * 1e3:.2f} ms ({(t_sf + t_band) * 1e3:.2f}) | "
                  f"{t_sf / t_of:.2f}x ({(t_sf + t_band) / t_of:.2f}x) | {t_ob * 1e3:.2f} ms | {t_sb * 1e3:.2f} ms | "
                  f"{t_sb / t_ob:.2f}x | {diff:.1e} |", flush=True)
    print("(ratio = scipy time / torchmech time: > 1 means torchmech is faster)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B in {1, 64}, T in {100, 1000}, repeat 2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-over", type=float, default=20.0, help="skip combinations predicted over this many s/run")
    ap.add_argument("--timeout", type=float, default=240.0, help="per-configuration subprocess limit in seconds")
    ap.add_argument("--dense-skip-over", type=float, default=40.0, help="the same for the dense reference")
    ap.add_argument("--Bs", help="comma-separated batch sizes (default 1,64,1024)")
    ap.add_argument("--Ts", help="comma-separated grid lengths (default 100,1000,10000)")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--in-process", action="store_true",
                    help="measure every configuration in this process (the default on CUDA; on CPU the peak "
                         "memory then counts pages earlier configurations left resident)")
    ap.add_argument("--no-peer", action="store_true", help="skip the scipy (LAPACK banded Cholesky) peer table")
    ap.add_argument("--peer-only", action="store_true", help="only the scipy peer table (B, T from --Bs/--Ts)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--B", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return child(args)

    Bs = (1, 64) if args.quick else (1, 64, 1024)
    Ts = (100, 1000) if args.quick else (100, 1000, 10000)
    Bs = tuple(int(x) for x in args.Bs.split(",")) if args.Bs else Bs
    Ts = tuple(int(x) for x in args.Ts.split(",")) if args.Ts else Ts
    repeat = min(args.repeat, 2) if args.quick else args.repeat
    peer_Bs = tuple(b for b in Bs if b <= 64) or Bs[:1]  # the peer loops over samples in Python: small batches
    peer_Ts = tuple(t for t in Ts if t <= 10000)
    if args.peer_only:
        return peer_scipy(peer_Bs, peer_Ts, max(repeat, 1), args.threads)
    dtypes = args.dtypes.split(",")
    methods = args.methods.split(",")
    results: dict = {}
    # CUDA peak memory is exact in one process (max_memory_allocated after a reset), and a subprocess per
    # configuration would pay torch's import and CUDA's start-up each time; on CPU the RSS high-water mark
    # needs a fresh process per configuration.
    in_process = args.in_process or args.device.startswith("cuda")
    t_start = time.perf_counter()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    for dtype in dtypes:
        for B in Bs:
            for T in Ts:
                for m in methods:
                    key = (m, dtype, B, T)
                    if m == "dense" and not dense_fits(B, T):
                        results[key] = {"skip": "n/a"}
                        continue
                    if m in ("lapack", "native") and not args.device.startswith("cpu"):
                        results[key] = {"skip": "n/a"}  # CPU-only methods
                        continue
                    guess = predict(results, m, dtype, B, T)
                    limit = args.dense_skip_over if m == "dense" else args.skip_over
                    if guess is not None and guess > limit:
                        results[key] = {"skip": f"skip (~{guess:.0f} s)"}
                        log(f"[{time.perf_counter() - t_start:6.0f}s] {m:8s} {dtype} B={B:<5d} T={T:<6d} "
                            f"skipped: predicted {guess:.0f} s per run")
                        continue
                    if in_process:
                        try:
                            r = measure(m, dtype, B, T, args.device, repeat, args.threads, limit)
                        except Exception as exc:  # reported in the table, the sweep goes on
                            results[key] = {"skip": "error"}
                            log(f"{m} {dtype} B={B} T={T}: failed: {type(exc).__name__}: {exc}")
                            continue
                    else:
                        cmd = [sys.executable, __file__, "--_child", "--method", m, "--dtype", dtype, "--B", str(B),
                               "--T", str(T), "--device", args.device, "--repeat", str(repeat),
                               "--threads", str(args.threads), "--skip-over", str(limit)]
                        try:
                            pr = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                        except subprocess.TimeoutExpired:
                            results[key] = {"skip": f"timeout >{args.timeout:.0f} s"}
                            log(f"{m} {dtype} B={B} T={T}: timed out")
                            continue
                        if pr.returncode != 0:
                            results[key] = {"skip": "error"}
                            log(f"{m} {dtype} B={B} T={T}: failed\n{pr.stderr[-2000:]}")
                            continue
                        r = json.loads(pr.stdout.strip().splitlines()[-1])
                    r["time"] = statistics.median(r["times"]) if r["times"] else r["first"]
                    results[key] = r
                    log(f"[{time.perf_counter() - t_start:6.0f}s] {m:8s} {dtype} B={B:<5d} T={T:<6d} "
                        f"{fmt_t(r):>10s}  peak {fmt_m(r):>6s} MB  (runs {['%.3f' % x for x in r['times']]})")

    bw = measure_bandwidth(args.device, args.threads)
    threads = next((r["threads"] for r in results.values() if "threads" in r), "?")

    print(f"\nNeuRLP forward+backward, device {args.device}, torch threads {threads}, K={K} D={D} E={E} "
          f"T0={T0} K0={K0}; median of {repeat} runs after a warm-up; peak = extra memory in MB "
          f"({'CUDA max_memory_allocated' if args.device.startswith('cuda') else 'RSS high-water growth'})\n")
    print("| dtype | B | T | " + " | ".join(f"{m} time" for m in methods) + " | "
          + " | ".join(f"{m} MB" for m in methods) + " |")
    print("|" + "---|" * (3 + 2 * len(methods)))
    for dtype in dtypes:
        for B in Bs:
            for T in Ts:
                row = [dtype, str(B), str(T)] + [fmt_t(results.get((m, dtype, B, T))) for m in methods]
                row += [fmt_m(results.get((m, dtype, B, T))) for m in methods]
                print("| " + " | ".join(row) + " |")

    def t(m, dtype, B, T):
        r = results.get((m, dtype, B, T))
        return r["time"] if r and "time" in r else None

    def ratio(a, b):
        return f"{a / b:.1f}x" if a and b else "-"

    print("\nRatios (time of the first over the second; > 1 means the second is faster)\n")
    print("| dtype | B | T | banded / parallel | dense / parallel | auto / parallel | banded / auto |")
    print("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for B in Bs:
            for T in Ts:
                p = t("parallel", dtype, B, T)
                print(f"| {dtype} | {B} | {T} | {ratio(t('banded', dtype, B, T), p)} | "
                      f"{ratio(t('dense', dtype, B, T), p)} | {ratio(t('auto', dtype, B, T), p)} | "
                      f"{ratio(t('banded', dtype, B, T), t('auto', dtype, B, T))} |")
    if 10000 in Ts:
        print("\nScaling in T: time(T=10000) / time(T=1000) (goal <= ~11x)\n")
        print("| dtype | B | " + " | ".join(m for m in methods if m != "dense") + " |")
        print("|---|---|" + "---|" * len([m for m in methods if m != "dense"]))
        for dtype in dtypes:
            for B in Bs:
                cells = [ratio(t(m, dtype, B, 10000), t(m, dtype, B, 1000)) for m in methods if m != "dense"]
                print(f"| {dtype} | {B} | " + " | ".join(cells) + " |")
        for m in ("parallel", "auto"):
            print(f"\n{m} >= 10x banded at B=64, T=1000: " + ", ".join(
                f"{dt} {ratio(t('banded', dt, 64, 1000), t(m, dt, 64, 1000))}" for dt in dtypes))

    print(f"\nMemory bandwidth (tensor copy, read+write): {bw / 1e9:.1f} GB/s")
    Bb = max(Bs)
    for dtype in dtypes if 1000 in Ts else ():
        item = 8 if dtype == "float64" else 4
        nb = solve_bytes(Bb, 1000, item)
        bound = nb / bw
        for m in ("parallel", "auto"):
            tm = t(m, dtype, Bb, 1000)
            print(f"  {dtype} B={Bb} T=1000: {nb / 1e6:.0f} MB must move -> bound {bound * 1e3:.1f} ms; "
                  f"{m} measured {fmt_t(results.get((m, dtype, Bb, 1000)))} = "
                  f"{(tm / bound) if tm else float('nan'):.1f}x the bound (goal <= 5x)")
    skipped = [f"{m} {dt} B={b} T={tt} ({r['skip']})" for (m, dt, b, tt), r in results.items()
               if "skip" in r and r["skip"] != "n/a"]
    print("Peak memory below ~1 MB is at the noise floor of RSS accounting (pages already resident get reused).")
    print(f"Dense: only where T*n <= 3000 and its matrices fit in ~4 GB ('n/a' otherwise).")
    print("Skipped: " + ("; ".join(skipped) if skipped else "none"))
    if not args.no_peer and args.device == "cpu":
        peer_scipy(peer_Bs, peer_Ts, max(repeat, 1), args.threads)
    print(f"Total wall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"|".join(map(str, k)): v for k, v in results.items()} | {"bandwidth": bw}, f, indent=1)


if __name__ == "__main__":
    main()
