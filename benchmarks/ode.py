"""ODE solver benchmark: torchmech.de against torchdiffeq and torchode, both sides in one process.

Workloads (issue 3):

1. Van der Pol (mu = 2), batch 256 of random initial states in [-2, 2]^2, rtol = atol = 1e-5,
   t in [0, 7.6], 200 save points, Dopri5 and Tsit5. torchmech and torchode step every sample on its
   own; torchdiffeq steps the whole batch with one shared step (its only mode). torchmech also with
   dense output (``SaveAt(dense=True)``, then ``Solution.evaluate`` at the 200 times).
2. Neural ODE training step: MLP 2-64-64-2 tanh, batch 512, t in [0, 1], 10 save points,
   rtol = atol = 1e-4, Dopri5, loss = mean squared error against a fixed target; forward + backward
   with each torchmech adjoint and with torchdiffeq's odeint / odeint_adjoint.

Reported: wall time = median of --repeat runs after one warm-up run (the warm-up time is reported
separately; for compiled modes it includes compilation); the timed runs of all cases of a table
go round-robin, so load from other processes on a shared machine spreads over every case; vector-field calls (batched calls, forward
and backward solves together), mean accepted steps per sample (per-sample solvers) or shared steps
(torchdiffeq), max abs deviation from a float64 reference at the save points, and ratios to
torchdiffeq. Solver overhead on the MLP workload = 1 - (estimated time inside the vector field) /
total, the vector-field time being n_grad_calls * (standalone MLP forward+backward time) +
n_nograd_calls * (standalone forward time) at batch 512.

    .venv/bin/python benchmarks/ode.py                 # everything available, float32, CPU
    .venv/bin/python benchmarks/ode.py --quick         # fewer repeats
    .venv/bin/python benchmarks/ode.py --compile       # also torch.compile modes (slow warm-up)
    .venv/bin/python benchmarks/ode.py --device cuda

Peers are optional: a missing torchdiffeq or torchode is reported as skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

import torchmech
import torchmech.de as de

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None
try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None

MU = 2.0
FIXED_H = 0.05  # step of the fixed-step training-step variant


class Counter:
    def __init__(self):
        self.grad = 0
        self.nograd = 0

    @property
    def total(self):
        return self.grad + self.nograd

    def hit(self):
        if torch.is_grad_enabled():
            self.grad += 1
        else:
            self.nograd += 1


def vdp(y, count):
    if count is not None:  # compiled runs pass None: Python-side counting would force recompiles
        count.hit()
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, MU * (1 - x * x) * v - x], dim=-1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    """Warm-up now, timed runs later: ``run`` times every registered case round-robin, so load from
    other processes on a shared machine spreads over all cases instead of biasing one."""

    def __init__(self, device):
        self.device = device
        self.cases = []

    def add(self, fn, no_grad=False):
        """Run ``fn`` once (the warm-up, timed); returns the case dict (``warm``, ``out``, later ``med``)."""
        def call():
            if no_grad:
                with torch.no_grad():
                    return fn()
            return fn()

        sync(self.device)
        t0 = time.perf_counter()
        out = call()
        sync(self.device)
        case = {"fn": call, "warm": time.perf_counter() - t0, "out": out, "times": []}
        self.cases.append(case)
        return case

    def run(self, repeat):
        for _ in range(repeat):
            for case in self.cases:
                sync(self.device)
                t0 = time.perf_counter()
                case["fn"]()
                sync(self.device)
                case["times"].append(time.perf_counter() - t0)
        for case in self.cases:
            case["med"] = statistics.median(case["times"])


def timed(fn, repeat, device):
    """(warm-up seconds, median seconds, last result) of back-to-back runs."""
    bench = Bench(device)
    case = bench.add(fn)
    bench.run(repeat)
    return case["warm"], case["med"], case["out"]


def fmt_t(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


# -- Van der Pol -----------------------------------------------------------------------------------

def vdp_runs(args, device, dtype):
    bench = Bench(device)
    torch.manual_seed(0)
    B = 256
    y0 = (torch.rand(B, 2, dtype=torch.float64) * 4 - 2).to(device=device, dtype=dtype)
    ts = torch.linspace(0, 7.6, 200, dtype=dtype, device=device)
    tol = 1e-5
    ref = de.solve(lambda t, y, a: vdp(y, Counter()), de.Dopri8(), 0.0, 7.6, y0.double(),
                   saveat=de.SaveAt(ts=ts.double()), controller=de.PIDController(1e-11, 1e-11), max_steps=100000).ys
    rows = []

    for name in ("Dopri5", "Tsit5"):
        solver = getattr(de, name)()
        cnt = Counter()

        def ours(compile=False, solver=solver, cnt=cnt):
            c = None if compile is not False else cnt
            return de.solve(lambda t, y, a: vdp(y, c), solver, 0.0, 7.6, y0, saveat=de.SaveAt(ts=ts),
                            controller=de.PIDController(tol, tol), compile=compile)

        def ours_dense(solver=solver, cnt=cnt):
            # dense output instead of save times: the whole solution, evaluated afterwards at ts
            sol = de.solve(lambda t, y, a: vdp(y, cnt), solver, 0.0, 7.6, y0, saveat=de.SaveAt(dense=True),
                           controller=de.PIDController(tol, tol))
            return types.SimpleNamespace(ys=sol.evaluate(ts), stats=sol.stats)

        cnt.grad = cnt.nograd = 0
        case = bench.add(ours_dense, no_grad=True)
        rows.append((f"torchmech {name} (eager, SaveAt(dense=True) + evaluate(ts))", case, None, cnt.total,
                     case["out"].stats["num_accepted"].double().mean().item(),
                     (case["out"].ys.double() - ref).abs().max().item(), ""))
        modes = [("eager", False)]
        if args.compile:  # the default compile (on CPU with Inductor's C++ wrapper), and with the Python wrapper
            modes += [("compiled", True), ("compiled, Python wrapper", {"cpp_wrapper": False})]
        for mode, comp in modes:
            cnt.grad = cnt.nograd = 0
            try:
                case = bench.add(lambda comp=comp, ours=ours: ours(comp), no_grad=True)
            except Exception as exc:  # noqa: BLE001
                rows.append((f"torchmech {name} ({mode})", None, None, None, None, None, repr(exc)[:80]))
                continue
            sol = case["out"]
            calls = cnt.total if comp is False else rows[-1][3]
            err = (sol.ys.double() - ref).abs().max().item()
            steps = sol.stats["num_accepted"].double().mean().item()
            rows.append((f"torchmech {name} ({mode})", case, None, calls, steps, err, ""))

        if torchode is not None:
            cnt_o = Counter()
            def make(c):
                term = torchode.ODETerm(lambda t, y: vdp(y, c))
                meth = getattr(torchode, name)(term=term)
                ctrl = torchode.IntegralController(atol=tol, rtol=tol, term=term)
                return torchode.AutoDiffAdjoint(meth, ctrl)

            t_eval = ts.expand(B, -1)
            problem = torchode.InitialValueProblem(y0=y0, t_eval=t_eval)
            variants = [("eager", make(cnt_o))]
            if args.compile:
                variants.append(("compiled", torch.compile(make(None))))
            for mode, s in variants:
                cnt_o.grad = cnt_o.nograd = 0
                try:
                    case = bench.add(lambda s=s, problem=problem: s.solve(problem), no_grad=True)
                except Exception as exc:  # noqa: BLE001
                    rows.append((f"torchode {name} ({mode})", None, None, None, None, None, repr(exc)[:80]))
                    continue
                sol = case["out"]
                calls = cnt_o.total if mode == "eager" else rows[-1][3]
                err = (sol.ys.double() - ref).abs().max().item()
                steps = sol.stats["n_accepted"].double().mean().item()
                rows.append((f"torchode {name} ({mode})", case, None, calls, steps, err, ""))
        else:
            rows.append((f"torchode {name}", None, None, None, None, None, "skipped: torchode not installed"))

    if torchdiffeq is not None:
        cnt_d = Counter()
        case = bench.add(lambda: torchdiffeq.odeint(lambda t, y: vdp(y, cnt_d), y0, ts, rtol=tol, atol=tol,
                                                    method="dopri5"), no_grad=True)
        calls = cnt_d.total
        err = (case["out"].transpose(0, 1).double() - ref).abs().max().item()
        rows.append(("torchdiffeq dopri5 (shared step)", case, None, calls, (calls - 2) / 6, err, ""))
    else:
        rows.append(("torchdiffeq dopri5", None, None, None, None, None, "skipped: torchdiffeq not installed"))
    bench.run(args.repeat)
    return [(r[0], r[1]["warm"], r[1]["med"]) + r[3:] if isinstance(r[1], dict) else r for r in rows]


# -- neural ODE training step ------------------------------------------------------------------------

class MLP(torch.nn.Module):
    def __init__(self, count):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                       torch.nn.Tanh(), torch.nn.Linear(64, 2))
        self.count = count

    def forward(self, t, y, args=None):
        if self.count is not None:
            self.count.hit()
        return self.net(y)


def train_runs(args, device, dtype):
    torch.manual_seed(0)
    B = 512
    cnt = Counter()
    model = MLP(cnt).to(device=device, dtype=dtype)
    y0 = torch.randn(B, 2, device=device, dtype=dtype)
    ts = torch.linspace(0, 1, 10, device=device, dtype=dtype)
    target = torch.randn(B, 10, 2, device=device, dtype=dtype)  # batch-first
    tol = 1e-4
    params = list(model.parameters())

    # standalone vector-field costs at batch 512
    def vf_fb():
        y = y0.clone().requires_grad_(True)
        out = model.net(y)
        torch.autograd.grad(out.sum(), [y] + params)

    def vf_f():
        with torch.no_grad():
            model.net(y0)

    _, c_fb, _ = timed(vf_fb, 50, device)
    _, c_f, _ = timed(vf_f, 50, device)

    def step_ours(adjoint, compile=False):
        def run():
            model.zero_grad(set_to_none=True)
            sol = de.solve(de.ODETerm(model), de.Dopri5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=ts),
                           controller=de.PIDController(tol, tol), adjoint=adjoint, **({"compile": True} if compile else {}))
            loss = (sol.ys - target).pow(2).mean()
            loss.backward()
            return loss.detach()
        return run

    def step_td(fn, **kw):
        def run():
            model.zero_grad(set_to_none=True)
            out = fn(model, y0, ts, rtol=tol, atol=tol, method="dopri5", **kw)
            loss = (out.transpose(0, 1) - target).pow(2).mean()
            loss.backward()
            return loss.detach()
        return run

    def step_fixed(kind):
        def run():
            model.zero_grad(set_to_none=True)
            if kind == "native":
                ys = de.solve(de.ODETerm(model), de.RK4(), 0.0, 1.0, y0, dt0=FIXED_H, controller=de.ConstantStep(),
                              saveat=de.SaveAt(ts=ts)).ys
            else:
                odeint = torchmech.odeint if kind == "compat" else torchdiffeq.odeint
                ys = odeint(model, y0, ts, method="rk4", options={"step_size": FIXED_H}).transpose(0, 1)
            loss = (ys - target).pow(2).mean()
            loss.backward()
            return loss.detach()
        return run

    cases = [
        ("torchmech DirectAdjoint", step_ours(de.DirectAdjoint())),
        ("torchmech CheckpointAdjoint", step_ours(de.CheckpointAdjoint())),
        ("torchmech BacksolveAdjoint(seminorm)", step_ours(de.BacksolveAdjoint(rtol=tol, atol=tol))),
    ]
    if args.compile:
        cases.append(("torchmech DirectAdjoint (compiled)", step_ours(de.DirectAdjoint(), compile=True)))
    if torchdiffeq is not None:
        cases += [
            ("torchdiffeq odeint", step_td(torchdiffeq.odeint)),
            ("torchdiffeq odeint_adjoint", step_td(torchdiffeq.odeint_adjoint)),
            ("torchdiffeq odeint_adjoint (seminorm)", step_td(torchdiffeq.odeint_adjoint,
                                                              adjoint_options={"norm": "seminorm"})),
        ]
    cases += [("torchmech RK4 fixed step (solve, ConstantStep)", step_fixed("native")),
              ("torchmech.odeint rk4 (torchdiffeq layer)", step_fixed("compat"))]
    if torchdiffeq is not None:
        cases.append(("torchdiffeq odeint rk4", step_fixed("peer")))
    bench = Bench(device)
    pending = []
    for name, fn in cases:
        compiled = "compiled" in name

        def call(fn=fn, compiled=compiled):
            model.count = None if compiled else cnt  # no Python-side counting inside compiled code
            try:
                return fn()
            finally:
                model.count = cnt

        cnt.grad = cnt.nograd = 0
        try:
            case = bench.add(call)
        except Exception as exc:  # noqa: BLE001
            pending.append((name, None, (None, None, None, repr(exc)[:80])))
            continue
        pending.append((name, case, None if compiled else (cnt.grad, cnt.nograd)))
    bench.run(args.repeat)
    rows = []
    for name, case, info in pending:
        if case is None:
            rows.append((name,) + info[:1] + (None, None, None, info[3]))
            continue
        warm, med = case["warm"], case["med"]
        if info is None:
            rows.append((name, warm, med, None, None, "vf calls as eager"))
            continue
        g, ng = info
        vf_time = g * c_fb + ng * c_f
        overhead = max(0.0, 1 - vf_time / med)
        rows.append((name, warm, med, round(g + ng), overhead, ""))
    return rows, c_fb, c_f


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="3 repeats")
    p.add_argument("--compile", action="store_true", help="also run torch.compile modes")
    p.add_argument("--only", choices=["vdp", "train"], default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every case")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeat = min(args.repeat, 3)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"device {device}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"torchdiffeq {getattr(torchdiffeq, '__version__', 'missing')}, "
          f"torchode {getattr(torchode, '__version__', 'missing')}; median of {args.repeat} after 1 warm-up")
    if args.only in (None, "vdp"):
        rows = vdp_runs(args, device, dtype)
        base = next((r[2] for r in rows if r[0].startswith("torchdiffeq") and r[2]), None)
        print("\nVan der Pol mu=2, B=256, y0 in [-2,2]^2, t in [0, 7.6], 200 saves, rtol=atol=1e-5\n")
        print("| solver | warm-up | time | speed-up vs torchdiffeq | vf calls | steps/sample | max err |")
        print("|---|---|---|---|---|---|---|")
        for name, warm, med, calls, steps, err, note in rows:
            if med is None:
                print(f"| {name} | - | - | - | - | - | {note} |")
                continue
            ratio = f"{base / med:.2f}x" if base else "-"
            print(f"| {name} | {fmt_t(warm)} | {fmt_t(med)} | {ratio} | {calls} | {steps:.1f} | {err:.1e} |")
    if args.only in (None, "train"):
        rows, c_fb, c_f = train_runs(args, device, dtype)
        base = next((r[2] for r in rows if r[0] == "torchdiffeq odeint" and r[2]), None)
        print(f"\nNeural ODE training step: MLP 2-64-64-2 tanh, B=512, t in [0,1], 10 saves, rtol=atol=1e-4, Dopri5 "
              f"(MLP fwd+bwd {c_fb * 1e3:.2f} ms, fwd {c_f * 1e3:.2f} ms)\n")
        print("| method | warm-up | time | speed-up vs torchdiffeq odeint | vf calls | solver overhead |")
        print("|---|---|---|---|---|---|")
        fixed = [r for r in rows if "rk4" in r[0].lower()]
        adaptive = [r for r in rows if r not in fixed]
        print_train(adaptive, base)
        base = next((r[2] for r in fixed if r[0] == "torchdiffeq odeint rk4" and r[2]), None)
        print(f"\nThe same training step with fixed-step RK4, h = {FIXED_H} ({round(1 / FIXED_H)} steps; save "
              f"values interpolated)\n")
        print("| method | warm-up | time | speed-up vs torchdiffeq odeint rk4 | vf calls | solver overhead |")
        print("|---|---|---|---|---|---|")
        print_train(fixed, base)


def print_train(rows, base):
    for name, warm, med, calls, overhead, note in rows:
        if med is None or calls is None:
            r = f"{base / med:.2f}x" if med and base else "-"
            print(f"| {name} | {fmt_t(warm) if warm else '-'} | {fmt_t(med) if med else '-'} | {r} | - | {note} |")
            continue
        ratio = f"{base / med:.2f}x" if base else "-"
        print(f"| {name} | {fmt_t(warm)} | {fmt_t(med)} | {ratio} | {calls} | {overhead:.0%} |")


if __name__ == "__main__":
    main()
