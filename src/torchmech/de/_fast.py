"""The lean stepping loop used by ``solve`` for the common case (explicit RK on an ODETerm).

Why a second loop: on small states every tensor operation costs a few microseconds of dispatch
whatever its size, so the generic step (terms, controls, events, per-step save windows, one
host read-back per feature) spends most of its time outside the vector field. This loop does
the same arithmetic with far fewer operations:

- stage inputs are ``addcmul(y, h, sum_j a_ij f_j)`` on the raw vector-field values, so the
  per-sample step size multiplies once per stage instead of once per stage increment;
- saving at ``SaveAt.ts`` is deferred: each step only keeps its start, end, state and stage
  values; every few dozen steps (and at the end of ``run_steps``) one vectorised pass finds
  which step covers each save time and evaluates the dense interpolant there;
- the host reads back one boolean per step (are all samples done?).

``step`` is a pure function of tensors (no data-dependent Python branching), so
``solve(compile=True)`` hands it to ``torch.compile`` unchanged, as ``steps``: a block of
``_BLOCK`` steps per compiled call, so the call's own cost and the read-back are paid once per block
(one step per call while autograd records, where a block's surplus steps would cost backward work).
The save pass is compiled too (``_save_values``, with dynamic shapes): eagerly it is ~40 operations on
(batch x save times)-sized tensors, most of a compiled solve's time when there are many save times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchmech.de._tree import any_requires_grad, bcast
from torchmech.de.controllers import ConstantStep, PIDController, StepTo, _snap
from torchmech.de.integrate import Status

# bytes of per-step records (state + stage values) kept before a save pass runs
_RECORD_BUDGET = 64 * 2 ** 20
_MAX_RECORDS = 64
# compiled mode: a compiled save pass costs ~0.5-1 ms per call whatever its size, so it runs rarely
_MAX_RECORDS_COMPILED = 256
# records larger than this are kept only for steps that pass a save time (a few (B,) operations
# per step, worth it when the state is large and save times are sparse), at most 4 at a time
_FILTER_BYTES = 64 * 2 ** 10
# steps per compiled call: the call's own cost (guards, wrapper, the done read-back; ~80 us on CPU, as much
# as a small problem's step arithmetic) is paid once per block; a block that runs past the last sample's end
# repeats masked no-op steps (h = 0)
_BLOCK = 4


def unsupported(integ) -> str | None:
    """Why ``integ`` cannot use this loop (None if it can)."""
    from torchmech.de.solvers.rk import ExplicitRK
    from torchmech.de.terms import ODETerm

    solver, ctrl, terms = integ.solver, integ.controller, integ.terms
    if not isinstance(solver, ExplicitRK) or hasattr(solver, "init_vf") or type(solver).step is not ExplicitRK.step:
        return f"solver {type(solver).__name__} (only explicit Runge-Kutta solvers)"
    if not isinstance(terms, ODETerm) or any(
            getattr(type(terms), m) is not getattr(ODETerm, m) for m in ("vf", "contr", "prod")):
        return f"terms {type(terms).__name__} (only ODETerm)"
    if isinstance(ctrl, PIDController):
        if ctrl.step_ts is not None or ctrl.jump_ts is not None:
            return "PIDController step_ts/jump_ts"
        if type(ctrl).propose is not PIDController.propose:  # this loop proposes t + dt itself
            return f"controller {type(ctrl).__name__} (overrides propose)"
    elif type(ctrl) not in (ConstantStep, StepTo):
        return f"controller {type(ctrl).__name__} (only PIDController, ConstantStep and StepTo)"
    if integ.event is not None:
        return "events"
    if integ.saveat.steps:
        return "SaveAt(steps=True)"
    if integ.progress:
        return "progress=True"
    return None


def _nonzero(row) -> tuple:
    return tuple((j, float(w)) for j, w in enumerate(row) if w != 0)


def _lincomb(terms: tuple, fs: list) -> Tensor:
    """``sum_j w_j fs[j]`` over the non-zero ``(j, w)`` pairs (one operation per pair)."""
    if not terms:
        return torch.zeros_like(fs[0])
    j, w = terms[0]
    out = fs[j] * w
    for j, w in terms[1:]:
        out = torch.add(out, fs[j], alpha=w)
    return out


class Plan:
    """Per-solver constants of the lean loop (Python floats, so compiled code bakes them in)."""

    def __init__(self, integ):
        from torchmech.de.solvers.rk import ExplicitRK, interp_dtype

        solver = integ.solver
        tab = solver.tableau
        s = tab.stages
        self.stages = tuple((float(tab.c[i]), _nonzero(tab.a[i - 1])) for i in range(1, s))
        self.b = _nonzero(tab.b)
        self.fsal = bool(tab.fsal)
        self.b_last = float(tab.b[-1])
        self.adaptive = bool(integ.controller.adaptive)
        self.custom_err = tab.b_error is not None and type(solver).error_estimate is not ExplicitRK.error_estimate
        self.err = _nonzero(tab.b_error) if tab.b_error is not None else ()
        self.save = integ.ts is not None
        # dense output (SaveAt(dense=True), and BacksolveAdjoint's backward solve): each step returns the
        # generic loop's record dict (tprev, tnext, h, valid, y0, qs) for the Solution's interpolant or
        # the caller's quadrature
        self.records = bool(integ.record_dense)
        self.dense_stages = tuple((float(c), _nonzero(row)) for c, row in (tab.dense_stages or ())) \
            if (self.save or self.records) and tab.dense is not None else ()
        self.nfev = (s - 1) + (0 if self.fsal else 1) + len(self.dense_stages)
        # interpolant y(t + theta h) = y + h sum_r W_r(theta) F_r with W_r = sum_m poly[r][m-1] theta^m,
        # F = the stage values (plus extra dense stages), or for cubic Hermite the stages and f(t1, y1)
        if tab.dense is not None:
            poly = [list(map(float, r)) for r in tab.dense]
            self.hermite = False
        else:
            poly = [[0.0, 3 * float(bi), -2 * float(bi)] for bi in tab.b] + [[0.0, -1.0, 1.0]]
            poly[0] = [1.0, poly[0][1] - 2.0, poly[0][2] + 1.0]
            self.hermite = True
        self.poly = poly
        # Q_p = sum_r poly[r][p] F_r: the non-zero (r, weight) pairs of each interpolant coefficient
        self.qrows = tuple(_nonzero([row[p] for row in poly]) for p in range(len(poly[0])))
        # the dtype of the Q_p (float64 for a low-precision state when the coefficients are large)
        self.qdtype = interp_dtype(tab, integ.y0.dtype)

    def qs(self, fs: list) -> list:
        """The interpolant's coefficients ``Q_p`` (unscaled by h) from the stage values ``fs``."""
        if fs and fs[0].dtype != self.qdtype:
            fs = [f.to(self.qdtype) for f in fs]
        return [_lincomb(qr, fs) for qr in self.qrows]


def _stages(P: Plan, f, args, t: Tensor, t_next: Tensor, h: Tensor, hb: Tensor, y: Tensor, f0: Tensor):
    """The Runge-Kutta stages of one step from t to t_next = t + h (hb: h broadcast against y).

    Returns (stage values [f0, k2, ...], y1, f(t_next, y1))."""
    fs = [f0]
    yi = y
    for c, row in P.stages:
        yi = torch.addcmul(y, hb, _lincomb(row, fs))
        ti = t_next if c == 1.0 else torch.add(t, h, alpha=c)
        fs.append(f(ti, yi, args))
    if P.fsal:
        y1 = yi if P.b_last == 0 else torch.addcmul(yi, hb, fs[-1], value=P.b_last)
        return fs, y1, fs[-1]
    y1 = torch.addcmul(y, hb, _lincomb(P.b, fs))
    return fs, y1, f(t_next, y1, args)


def step(P: Plan, integ, stack: bool, t, y, dt, f0, done, status, nonfinite, nsteps, nacc, nrej, nfev, e1, e2):
    """One attempted step of every unfinished sample (same semantics as ``_Integrator.step``).

    Returns (new state tuple, record). record = (t, t_new, y, F) for the deferred save pass (F:
    the R stage values, a tuple in eager mode, stacked (R, B, ...) with ``stack``
    (compiled mode)), None when nothing is saved at ``ts``.
    """

    f, args = integ.terms.f, integ.args
    d, t1 = integ.direction, integ.t1
    active = ~done
    t_next = torch.where(active, _snap(t + dt, dt, t1, d), t)
    h = t_next - t
    hb = bcast(h, y)
    fs, y1, f1 = _stages(P, f, args, t, t_next, h, hb, y, f0)
    ctrl = integ.controller
    err = None
    with torch.no_grad():  # the error estimate only steers the controller: no graph for it
        if P.adaptive:
            if P.custom_err:
                err = integ.solver.error_estimate([fi * hb for fi in fs])
            else:
                err = _lincomb(P.err, fs) * hb
        # per sample: y1, f1 and err all finite? (x * 0 is 0 for finite x and NaN otherwise, and
        # a sum of zeros cannot overflow)
        parts = [y1, f1] if err is None else [y1, f1, err]
        finite = torch.isfinite(torch.stack(parts, dim=1).mul_(0).reshape(y.shape[0], -1).sum(dim=1))
    # (only when the step's graph is recorded: the new state, the next first stage or a stage value the save pass
    # reads requires grad; without a graph there is nothing to redo, and no host read-back)
    redo = not stack and any_requires_grad((y1, f1, fs)) and not bool((finite | done).all())
    if redo:
        # A sample whose stages went non-finite is rejected, but its rows would stay in the autograd graph: they
        # get zero gradients, and 0 * NaN (sqrt's derivative at a negative stage, say) is NaN, which the
        # parameters' gradients sum over the batch. So the graph takes the step again with h = 0 for those
        # samples (stages at their accepted state); the other samples' values are unchanged, and every decision
        # (acceptance, next dt) stays the one taken above. (Eager only: compiled steps keep the graph as is.)
        keep = finite | done
        h = torch.where(keep, h, torch.zeros_like(h))
        hb = bcast(h, y)
        # (t_next itself for the others: t + h may differ from it in the last bit)
        fs, y1, f1 = _stages(P, f, args, t, torch.where(keep, t_next, t), h, hb, y, f0)
    if P.adaptive:
        accept, dt_new, underflow, cst = ctrl.adapt(t, t_next, dt, y, y1, err, {"e1": e1, "e2": e2},
                                                   integ.solver.error_order)
        e1, e2 = cst["e1"], cst["e2"]
        limit = 10
    else:
        accept = active
        dt_new = dt
        underflow = torch.zeros_like(done)
        limit = 1
    accept = accept & finite & active
    bad = active & ~finite
    nonfinite = torch.where(bad, nonfinite + 1, torch.where(accept, 0, nonfinite))
    fail_nonfinite = bad & ((nonfinite >= limit) | underflow)
    underflow = underflow & active & ~accept & ~fail_nonfinite
    dt_new = torch.where(active, dt_new, dt)
    acc_b = bcast(accept, y)
    y_new = torch.where(acc_b, y1, y)
    t_new = torch.where(accept, t_next, t)
    f_new = torch.where(acc_b, f1, f0)
    new_done = done | (accept & (t_new == t1))
    nsteps = nsteps + active
    hit_max = active & ~new_done & (nsteps >= integ.max_steps) & ~underflow & ~fail_nonfinite
    status = torch.where(hit_max, int(Status.MAX_STEPS), status)
    status = torch.where(underflow, int(Status.DT_UNDERFLOW), status)
    status = torch.where(fail_nonfinite, int(Status.NONFINITE), status)
    new_done = new_done | hit_max | underflow | fail_nonfinite
    nacc = nacc + accept
    nrej = nrej + (active & ~accept)
    nfev = nfev + P.nfev * active * (2 if redo else 1)
    record = None
    if P.save or P.records:
        for c, row in P.dense_stages:
            fs.append(f(torch.add(t, h, alpha=c), torch.addcmul(y, hb, _lincomb(row, fs)), args))
        if P.hermite:
            fs.append(f1)
    if P.records:
        # the generic loop's dense record: y(theta) = y + sum_p theta^(p+1) q_p, q_p = h Q_p
        qs = tuple(q * hb for q in P.qs(fs))
        record = {"tprev": t, "tnext": t_next, "h": torch.where(accept, h, torch.zeros_like(h)),
                  "valid": accept, "y0": y, "qs": qs}
    elif P.save:
        # eager: the stage values as they are (the save pass stacks only the records it keeps)
        F = torch.stack(fs) if stack else tuple(fs)
        record = (t, t_new, y, F)
    state = (t_new, y_new, dt_new, f_new, new_done, status, nonfinite, nsteps, nacc, nrej, nfev, e1, e2)
    return state, record


def _flat_cols(idx: Tensor, S: int) -> Tensor:
    """Save columns (B, K) as indices (B, K*S) into the save buffer viewed as (B, (T+1)*S), S the state size per
    sample: a scatter along that axis with a contiguous index is ~4x faster than along the save axis with an
    index expanded over the state (36 vs 10 us for Van der Pol's (256, 48) slots)."""
    return (idx[..., None] * S + torch.arange(S, device=idx.device)).reshape(idx.shape[0], -1)


def save_pass(P: Plan, integ, buf: Tensor, records: list, compiled: dict | None = None) -> Tensor:
    """Fill every save time covered by the recorded steps into ``buf`` (B, T+1, ...); returns it.

    Per sample the recorded steps tile an interval ``[start, end]`` (rejected steps have zero
    length), so the step covering save time ``tau`` is the first whose end reaches ``tau``. ``records``: one
    ``step`` record per step, or (compiled mode) one ``steps`` block per call.
    ``compiled``: the Inductor options of a compiled solve (its values then come from the compiled
    ``_save_values``, and without autograd they are written into ``buf`` in place; ``buf`` must be contiguous).
    """
    d = integ.direction
    if records[0][0].dim() == 2:  # blocks of steps from the compiled ``steps``, already stacked
        tt, tn = torch.cat([r[0] for r in records]), torch.cat([r[1] for r in records])
        ys, fs = torch.cat([r[2] for r in records], dim=1), torch.cat([r[3] for r in records], dim=2)
    else:
        tt = torch.stack([r[0] for r in records])  # (M, B) step starts
        tn = torch.stack([r[1] for r in records])  # (M, B) step ends (== start when rejected)
        ys = torch.stack([r[2] for r in records], dim=1)  # (B, M, ...)
        fs = torch.stack([torch.stack(r[3]) for r in records], dim=2)  # (R, B, M, ...)
    M, B = tt.shape
    ends = (d * tn).T.contiguous()  # (B, M), non-decreasing per sample
    lo = torch.searchsorted(integ._dts, (d * tt[0])[:, None], right=True)
    hi = torch.searchsorted(integ._dts, ends[:, -1:].contiguous(), right=True)
    count = (hi - lo)[:, 0]
    K = int(count.max())
    if K == 0:
        return buf
    ar = torch.arange(K, device=tt.device)
    values = _save_values if compiled is None else _compiled_save(compiled)
    idx, vals = values(P, d, integ._ts_pad, tt, tn, ends, ys, fs, lo, count, ar)
    if compiled is not None and not (vals.requires_grad or buf.requires_grad):
        buf.view(B, -1).scatter_(1, _flat_cols(idx, vals[0, 0].numel()), vals.reshape(B, -1))
        return buf
    # (out of place, for autograd: the flat view of _flat_cols measured slower here than this expanded index)
    return buf.scatter(1, bcast(idx, vals).expand_as(vals), vals)


def _save_values(P: Plan, d, ts_pad, tt, tn, ends, ys, fs, lo, count, ar):
    """``save_pass``'s (save columns (B, K), values there (B, K, ...)), K = len(ar) slots per sample, of which
    the first ``count`` (B,) are the save times ``lo`` (B, 1) onwards. Step starts/ends ``tt``/``tn`` (M, B),
    ``ends`` = d * tn as (B, M), states ``ys`` (B, M, ...), stage values ``fs`` (R, B, M, ...)."""
    M, B = tt.shape
    K = ar.shape[0]
    T = ts_pad.shape[1] - 1
    used = ar[None] < count[:, None]
    idx = torch.where(used, lo + ar[None], T)  # unused slots write the spare column T
    tau = ts_pad.gather(1, idx)  # (B, K)
    m = torch.searchsorted(ends, d[:, None] * tau, right=False).clamp_(max=M - 1)
    bidx = torch.arange(B, device=tt.device)[:, None]
    # (a gather along the rows of the (B, M) transposes: ~4x faster eagerly than indexing tt[m, bidx])
    t_m = tt.T.contiguous().gather(1, m)
    h_m = tn.T.contiguous().gather(1, m) - t_m
    safe_h = torch.where(used & (h_m != 0), h_m, torch.ones_like(h_m))
    theta = torch.where(used, (tau - t_m) / safe_h, torch.zeros_like(tau))
    flat = (bidx * M + m).reshape(-1)  # (B*K,) rows of the (B*M) step records
    y_m = ys.reshape((B * M,) + ys.shape[2:]).index_select(0, flat).reshape((B, K) + ys.shape[2:])
    # per-step polynomial coefficients Q_p = sum_r poly[r][p] F_r, then gathered for each save
    # time: less work than weighting all R stage values per save time. (Elementwise rather than a
    # matmul: BLAS results can change in the last bit with memory alignment.)
    fl = list(fs.reshape((fs.shape[0], B * M) + ys.shape[2:]).unbind(0))
    # rows first: index_select along dim 0 (and its index_add_ backward) is several times faster
    # than along an inner dimension
    q = torch.stack(P.qs(fl), dim=1)
    q = q.index_select(0, flat)  # (B*K, deg, ...)
    th = bcast(theta.reshape(-1), q[:, 0])
    acc = q[:, -1]
    for p in range(len(P.qrows) - 2, -1, -1):
        acc = torch.addcmul(q[:, p], acc, th)
    incr = (acc * th).reshape(y_m.shape)  # sum_p theta^(p+1) Q_p
    return idx, torch.addcmul(y_m, bcast(h_m, y_m), incr).to(y_m.dtype)


def _run_grid(P: Plan, integ, state: dict, n) -> tuple[dict, list, bool] | None:
    """``run`` for ``ConstantStep``/``StepTo`` solves whose samples share one time grid, or None if they do not.

    Every sample steps together, so a step is only its stages: no step proposal, acceptance,
    status or save-window bookkeeping, and no host read-back. The stage and interpolation
    arithmetic is that of :func:`step` and :func:`save_pass` with the same operands (the grid is the
    one the per-sample loop would walk), so results agree with it to round-off. Finiteness is
    checked once at the end; if anything went non-finite the caller runs the per-sample loop
    instead, which stops the offending samples with status ``NONFINITE`` as usual.
    """
    from torchmech.de import _fast_sde

    G = _fast_sde.plan(integ)
    if G is None or bool(state["done"].any()):
        return None
    t = state["t"]
    t_now = float(t[0])
    if not bool((t == t[0]).all()) or t_now not in G.floats:
        return None
    k0 = G.floats.index(t_now)
    K = len(G.floats) - 1
    k1 = K if n is None else min(K, k0 + n)
    f, args = integ.terms.f, integ.args
    y, f0 = state["y"], state["vf"]
    B = G.B
    deg = len(P.poly[0])
    saved: dict = {}
    for k in range(k0, k1):
        tv, tn = G.grid[k].expand(B), G.grid[k + 1].expand(B)
        h = G.h[k].expand(B)
        hb = bcast(h, y)
        fs, y1, f1 = _stages(P, f, args, tv, tn, h, hb, y, f0)
        inner = [(col, theta) for col, theta in G.saves[k] if theta != 1.0]
        for col, theta in G.saves[k]:
            if theta == 1.0:  # a save time on the grid: the step's end point itself
                saved[col] = y1
        if inner:
            for c, row in P.dense_stages:
                fs.append(f(torch.add(tv, h, alpha=c), torch.addcmul(y, hb, _lincomb(row, fs)), args))
            if P.hermite:
                fs.append(f1)
            q = P.qs(fs)
            for col, theta in inner:
                th = torch.tensor(theta, dtype=P.qdtype, device=y.device)
                acc = q[-1]
                for p in range(deg - 2, -1, -1):
                    acc = torch.addcmul(q[p], acc, th)
                saved[col] = torch.addcmul(y, hb, acc * th).to(y.dtype)
        y, f0 = y1, f1
    with torch.no_grad():
        finite = bool(torch.isfinite(torch.stack([y, f0], dim=1).mul_(0).sum()))
    if not finite:
        return None
    m = k1 - k0
    extra = len(P.dense_stages) * sum(1 for k in range(k0, k1) if any(th != 1.0 for _, th in G.saves[k]))
    new = dict(state)
    new.update(t=G.grid[k1].expand(B).clone(), y=y, vf=f0, done=torch.full_like(state["done"], k1 == K),
               num_steps=state["num_steps"] + m, num_accepted=state["num_accepted"] + m,
               num_fevals=state["num_fevals"] + m * (P.nfev - len(P.dense_stages)) + extra)
    if saved:
        buf = state["ys_ts"]
        # one new buffer: the saved columns and the old buffer's other columns, stacked
        new["ys_ts"] = torch.stack([saved[c] if c in saved else buf[:, c] for c in range(buf.shape[1])], dim=1)
    return new, [], k1 == K


def _run_records(P: Plan, integ, state: dict, n, tensors: tuple, cst: dict) -> tuple[dict, list, bool]:
    """``run`` for dense output: up to ``n`` eager steps, each step's record (the generic loop's dense
    record) returned; values at ``SaveAt.ts`` are written from each step's interpolant as it is taken."""
    out: list = []
    k = 0
    all_done = False
    buf = state.get("ys_ts")
    while n is None or k < n:
        tensors, rec = step(P, integ, False, *tensors)
        out.append(rec)
        k += 1
        done = tensors[4].all()
        if buf is not None:
            before, count = integ.save_counts(rec["tprev"], rec["tnext"], rec["valid"])
            done, K = torch.stack([done.to(count.dtype), count.max()]).tolist()
            if K > 0:
                buf = integ.write_saves(buf, K, before, count, rec["tprev"], rec["tnext"] - rec["tprev"], rec["y0"],
                                        rec["qs"])
        if done:
            all_done = True
            break
    new = dict(state)
    new.update(zip(_KEYS, tensors[:11]))
    if "e1" in cst:
        new["ctrl"] = dict(cst, e1=tensors[11], e2=tensors[12])
    if buf is not None:
        new["ys_ts"] = buf
    return new, out, all_done


_KEYS = ("t", "y", "dt", "vf", "done", "status", "nonfinite", "num_steps", "num_accepted", "num_rejected",
         "num_fevals")

_COMPILED: dict = {}


def steps(P: Plan, integ, k: int, *state):
    """``k`` consecutive ``step`` calls (one compiled graph in compiled mode).

    Returns (state, the k steps' records as one block, whether all samples are done after the last step). The
    block stacks them along a step axis in ``save_pass``'s layout (step starts and ends (k, B), states (B, k, ...),
    stage values (R, B, k, ...)); None when nothing is saved. (One block instead of k records: each tensor a
    compiled call returns costs ~0.6 us on CPU, and the save pass concatenates 4x fewer pieces.)
    """
    records = []
    for _ in range(k):
        state, rec = step(P, integ, True, *state)
        records.append(rec)
    block = None
    if records[0] is not None:
        block = (torch.stack([r[0] for r in records]), torch.stack([r[1] for r in records]),
                 torch.stack([r[2] for r in records], dim=1), torch.stack([r[3] for r in records], dim=2))
    return state, block, state[4].all()


def _compile(fn, options: dict | None, dynamic: bool):
    """``fn`` compiled with these Inductor options (once per function and set of options)."""
    key = (fn.__name__,) + tuple(sorted((k, repr(v)) for k, v in (options or {}).items()))
    out = _COMPILED.get(key)
    if out is None:
        import torch._dynamo

        # one graph per problem structure (solver, vector field code, shapes, dtypes, steps per call)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        out = _COMPILED[key] = torch.compile(fn, dynamic=dynamic, options=dict(options) if options else None)
    return out


def _compiled_step(options: dict | None = None):
    """``steps`` compiled with these Inductor options (static shapes)."""
    return _compile(steps, options, dynamic=False)


def _compiled_save(options: dict | None = None):
    """``_save_values`` compiled with these Inductor options: dynamic shapes, since the number of records and
    of save times per pass vary from pass to pass."""
    return _compile(_save_values, options, dynamic=True)


def run(integ, state: dict, n: int | None, compiled: bool = False, options: dict | None = None
        ) -> tuple[dict, list, bool]:
    """``_Integrator.run_steps`` for problems ``unsupported`` accepts: up to ``n`` steps (all if None).

    Returns None when the caller's generic loop must run instead: a ``StepTo`` solve whose samples
    do not share one grid, that records its dense output, or that went non-finite.
    """
    P = getattr(integ, "_fast_plan", None)
    if P is None:
        P = integ._fast_plan = Plan(integ)
    if type(integ.controller) is StepTo:
        return None if P.records else _run_grid(P, integ, state, n)
    fn = _compiled_step(options) if compiled else step
    cst = state["ctrl"]
    ones = torch.ones_like(state["t"])
    tensors = tuple(state[k] for k in _KEYS) + (cst.get("e1", ones), cst.get("e2", ones))
    buf = state.get("ys_ts")
    y = tensors[1]
    per_step = y.numel() * y.element_size() * (len(P.poly) + 2)
    max_rec = max(1, min(_MAX_RECORDS, _RECORD_BUDGET // max(per_step, 1)))
    if P.records:  # dense output: eager steps, the records go back to the caller
        return _run_records(P, integ, state, n, tensors, cst)
    if not P.adaptive and not compiled:
        out = _run_grid(P, integ, state, n)
        if out is not None:
            return out
    records: list = []
    filt = P.save and not compiled and per_step > _FILTER_BYTES
    if filt:  # large records: a save pass every few kept steps keeps the buffer small
        if getattr(integ, "_dts_pad", None) is None:
            integ._dts_pad = torch.cat([integ._dts, torch.full_like(integ._dts[:, :1], float("inf"))], dim=1)
        # per sample, the next save index not yet passed
        nxt_f = torch.searchsorted(integ._dts, (integ.direction * tensors[0])[:, None], right=True)[:, 0]
        max_rec = min(max_rec, 4)
    save_opts = None
    if compiled:
        save_opts = dict(options or {})
        max_rec = max(1, min(_MAX_RECORDS_COMPILED, _RECORD_BUDGET // max(per_step, 1)))
        if P.save:
            buf = buf.contiguous()  # the compiled save pass writes into a flat view of it
    k = 0
    all_done = False
    # a bounded run (checkpoint segments) stops exactly at n; with autograd recording, one step per call:
    # a block's masked no-op steps after the last sample finishes would cost forward and backward work
    # (a 2-step training solve did 4 steps), more than the per-call cost a block saves. Autograd records
    # when grad mode is on and the state, the times or the field's value at t0 (so its parameters and
    # args) require grad; grad mode alone, as in a plain script, records nothing (1.15x faster in blocks).
    # (A parameter the field first reads after t0 is missed: its blocks then run under autograd, with the
    # same values and gradients and some masked steps' extra backward work.)
    recording = torch.is_grad_enabled() and any_requires_grad((tensors, integ.t1))
    block_steps = 1 if (n is not None or recording) else _BLOCK
    while n is None or k < n:
        if compiled:
            tensors, block, done = fn(P, integ, block_steps, *tensors)
            k += block_steps
            done = bool(done)  # the one host read-back per block
            if P.save:
                records.append(block)
                if len(records) * block_steps >= max_rec:
                    buf = save_pass(P, integ, buf, records, save_opts)
                    records = []
        elif filt:
            tensors, rec = fn(P, integ, False, *tensors)
            k += 1
            # keep the record only if some sample passed its next save time (one read-back per step)
            tn_d = integ.direction * tensors[0]
            hit = tn_d >= integ._dts_pad.gather(1, nxt_f[:, None])[:, 0]
            done, keep = torch.stack([tensors[4].all(), hit.any()]).tolist()
            if keep:
                records.append(rec)
                nxt_f = torch.searchsorted(integ._dts, tn_d[:, None], right=True)[:, 0]
                if len(records) >= max_rec:
                    buf = save_pass(P, integ, buf, records)
                    records = []
        else:
            tensors, rec = fn(P, integ, False, *tensors)
            k += 1
            if rec is not None:
                records.append(rec)
                if len(records) >= max_rec:
                    buf = save_pass(P, integ, buf, records)
                    records = []
            done = bool(tensors[4].all())  # the one host read-back per step
        if done:
            all_done = True
            break
    if records:
        buf = save_pass(P, integ, buf, records, save_opts)
    new = dict(state)
    new.update(zip(_KEYS, tensors[:11]))
    if "e1" in cst:
        new["ctrl"] = dict(cst, e1=tensors[11], e2=tensors[12])
    if buf is not None:
        new["ys_ts"] = buf
    return new, [], all_done
