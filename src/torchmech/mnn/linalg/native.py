"""C kernels of the NeuRLP solver (``neurlp.c``): the normal equations' assembly and banded Cholesky over the whole
batch at once, and the implicit backward's input gradients.

The C source ships with the package and is compiled with the system's C compiler (``$CC``, else ``cc``) the first
time it is needed, into a per-user cache (``$TORCHMECH_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchmech`` or
``~/.cache/torchmech``), and loaded through ctypes: no Python or torch headers, so it builds in well under a
second. The samples of the batch run in lockstep as vector lanes, so one call sweeps the grid once for all of
them. Without a working compiler, or with ``TORCHMECH_NATIVE=0``, ``available()`` is False: ``"auto"`` uses the
tensor-op solvers, the backward the tensor-op gradients, and ``method="native"`` raises with the reason.

Why C: on the CPU a sequential sweep over the grid is the least work, but written with tensor operations every
step pays dispatch for a few hundred floating-point operations, and LAPACK's band routines take one sample per
call. For B = 64 samples of T = 1000 steps (n = 3) the C code assembles and factorises in ~8 ms, against ~45 ms
for the tensor-op assembly and cyclic reduction, and forms the gradients in ~5 ms against ~19 ms
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from torchmech.mnn.linalg.blocktri import FactorizationError

_SOURCE = Path(__file__).with_name("neurlp.c")
# -O3 vectorises the lane loops; no -march=native, so that a cached library also runs on another CPU sharing the
# home folder (measured: the same speed here); -fno-math-errno lets sqrt vectorise. NaN must propagate, so no
# -ffast-math.
_FLAGS = ["-O3", "-fno-math-errno", "-std=c99", "-shared", "-fPIC"]
_LANES = 8  # V in neurlp.c

_lock = threading.Lock()
_state: dict = {}  # "lib" (ctypes.CDLL) or "error" (str), filled by the first call of _load


def _cache_dir() -> Path:
    if os.environ.get("TORCHMECH_CACHE_DIR"):
        return Path(os.environ["TORCHMECH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchmech"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "").strip() or "cc"
    return cc if shutil.which(cc.split()[0]) else None


def _build(cc: str) -> Path:
    """Compile neurlp.c (once per source, flags, compiler and machine type) and return the library's path."""
    src = _SOURCE.read_bytes()
    version = subprocess.run(cc.split() + ["--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(_FLAGS).encode(), cc.encode(), version.encode(),
                                     platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    lib = folder / f"neurlp-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes never load a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=".neurlp-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        res = subprocess.run(cc.split() + _FLAGS + ["-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"`{cc}` failed to compile {_SOURCE.name}: {(res.stderr or res.stdout).strip()[:500]}")
        if os.path.getsize(tmp) == 0:  # a "compiler" that succeeds without output must not poison the cache
            raise RuntimeError(f"`{cc}` wrote no library for {_SOURCE.name}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load():
    with _lock:
        if not _state:
            try:
                if os.environ.get("TORCHMECH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                    raise RuntimeError("disabled by TORCHMECH_NATIVE=0")
                cc = _compiler()
                if cc is None:
                    raise RuntimeError("no C compiler found (set $CC or install cc)")
                lib = ctypes.CDLL(str(_build(cc)))
                P, I = ctypes.c_void_p, ctypes.c_int64
                lib.tm_band_factor.argtypes = [I, I, I, I, P, P, P, P, P, P, P]
                lib.tm_band_solve.argtypes = [P, P, I, I, I, I, P, P, P, P]
                lib.tm_objective_grads.argtypes = [P, P, P, P]
                lib.tm_assemble.argtypes = [P, P, P, P, P]
                lib.tm_band_factor_scaled.argtypes = [I, I, I, P, P, P, P]
                for f in (lib.tm_band_factor, lib.tm_band_solve, lib.tm_objective_grads, lib.tm_assemble,
                          lib.tm_band_factor_scaled):
                    f.restype = None
                _state["lib"] = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["error"] = str(exc)
        return _state.get("lib")


def available() -> bool:
    """Whether the C banded solver is compiled and loaded (compiling it now if needed)."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why the C banded solver cannot be used ('' when it can)."""
    _load()
    return _state.get("error", "")


def _strides(t: Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _ptrs(tensors: list) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if x is None else x.data_ptr() for x in tensors])


def _smallest_pivot(piv: Tensor, min_pivot: float) -> float:
    """The smallest pivot L_ii^2 of the lanes in use; raises FactorizationError at or below min_pivot (or NaN)."""
    smallest = piv.min().item() if piv.numel() else math.inf
    if not smallest > min_pivot:  # (also a NaN pivot)
        raise FactorizationError(
            "Cholesky factorisation of the NeuRLP normal matrix broke down (matrix not positive definite "
            f"in this precision: a pivot failed or fell to <= {min_pivot:.1e} of its diagonal): the rows do not "
            "determine the solution, or the problem is too ill-conditioned; check the coefficients, steps and "
            "weights")
    return smallest


def _dims(p) -> ctypes.Array:
    return (ctypes.c_int64 * 8)(p.batch_shape.numel(), p.T, p.E, p.D, p.K, p.T0, p.K0, int(p.central))


def _flat_inputs(p) -> tuple[list[Tensor], ctypes.Array]:
    """The problem's inputs as float64 views with one batch axis, broadcast to their full shapes (stride 0 where
    they broadcast), in the C kernels' order {c, rhs, init, h, we, wi, ws, C}, and their 17 strides."""
    from torchmech.mnn.system import taylor_constant  # (system imports nothing from here)

    bs = p.batch_shape
    B, T, E, D, K, T0, K0 = bs.numel(), p.T, p.E, p.D, p.K, p.T0, p.K0

    def flat(x: Tensor, core: tuple) -> Tensor:
        """x broadcast to the batch and the given trailing shape, with one batch axis (a view where possible)."""
        # resolve_neg: a lazily negated view (e.g. z.conj().imag) keeps its memory un-negated, and C reads memory
        return x.detach().resolve_neg().expand(bs + core).reshape((B,) + core)

    c = flat(p.coefficients, (T, E, D, K))
    rhs = flat(p.rhs, (T, E))
    init = flat(p.init, (T0, D, K0))
    h = flat(p.steps, (T - 1,))
    w = [flat(x, ()) for x in (p.weight_equation, p.weight_init, p.weight_smooth)]
    C = taylor_constant(K, torch.float64, c.device).contiguous()
    strides = (ctypes.c_int64 * 17)(*c.stride(), *rhs.stride(), *init.stride(), *h.stride(),
                                    *[x.stride()[0] for x in w])
    return [c, rhs, init, h, *w, C], strides


class NativeBanded:
    """Factor of the Jacobi-scaled, float64, CPU block-banded normal matrix, all samples in one C sweep.

    ``diag`` (..., T, n, n), ``off1`` (..., T-1, n, n) = M[t, t+1], ``off2`` (..., T-2, n, n) = M[t, t+2] or
    None, unscaled, any strides (broadcast batch axes included); ``s`` (..., T, n) is the scaling, so the factor is
    that of S M S with S = diag(s). ``solve(x)`` takes and returns scaled (..., T, n, c), as LapackBanded's.
    ``min_pivot`` is the smallest pivot of the factor (relative to the unit diagonal).
    """

    def __init__(self, diag: Tensor, off1: Tensor, off2: Tensor | None, s: Tensor, min_pivot: float):
        lib = _load()
        if lib is None:
            raise RuntimeError(f"method='native' is unavailable: {unavailable_reason()}")
        blocks = [diag, off1] + ([off2] if off2 is not None else [])
        for x in blocks + [s]:
            if x.device.type != "cpu" or x.dtype != torch.float64:
                raise ValueError("NativeBanded: needs float64 blocks on the CPU")
        self.batch_shape = diag.shape[:-3]
        T, n = diag.shape[-3], diag.shape[-1]
        B = math.prod(self.batch_shape)
        self.T, self.n, self.B = T, n, B
        self.kd = len(blocks) * n - 1
        G = (B + _LANES - 1) // _LANES
        self.G = G
        # one batch axis: reshape is a view for the assembled (contiguous or structure-of-arrays) blocks
        flat = [x.detach().resolve_neg().expand(self.batch_shape + x.shape[-3:]).reshape((B,) + x.shape[-3:])
                for x in blocks]
        s_flat = s.detach().resolve_neg().expand(self.batch_shape + s.shape[-2:]).reshape((B,) + s.shape[-2:])
        ptrs = (ctypes.c_void_p * len(flat))(*[x.data_ptr() for x in flat])
        strides = (ctypes.c_int64 * (4 * len(flat)))(*[st for x in flat for st in x.stride()])
        N = T * n
        self.ab = torch.empty(G * N * (self.kd + 1) * _LANES, dtype=torch.float64)
        self.inv = torch.empty(G * N * _LANES, dtype=torch.float64)
        piv = torch.empty(G * _LANES, dtype=torch.float64)
        if B and N:
            lib.tm_band_factor(B, T, n, len(flat), ptrs, strides, s_flat.data_ptr(), _strides(s_flat),
                               self.ab.data_ptr(), self.inv.data_ptr(), piv.data_ptr())
        self.min_pivot = _smallest_pivot(piv[:B], min_pivot)

    @classmethod
    def from_problem(cls, p, min_pivot: float) -> tuple["NativeBanded", Tensor, Tensor]:
        """Assemble the normal equations of a problem without a slack in C (tm_assemble) and factorise them
        scaled to a unit diagonal: no (..., T, n, n) blocks are formed. Returns the factor, the right-hand side
        A^T W y (..., T, n) and the scaling s (..., T, n) (float64, CPU)."""
        lib = _load()
        if lib is None:
            raise RuntimeError(f"method='native' is unavailable: {unavailable_reason()}")
        if p.slack is not None:
            raise ValueError("NativeBanded.from_problem: the slack border is assembled by system.assemble")
        self = cls.__new__(cls)
        bs = p.batch_shape
        B, T, n = math.prod(bs), p.T, p.n
        self.batch_shape, self.T, self.n, self.B = bs, T, n, B
        self.kd = (3 if p.central and T >= 3 else 2) * n - 1
        G, N = (B + _LANES - 1) // _LANES, T * n
        self.G = G
        self.ab = torch.empty(G * N * (self.kd + 1) * _LANES, dtype=torch.float64)
        self.inv = torch.empty(G * N * _LANES, dtype=torch.float64)
        b = torch.empty((B, N), dtype=torch.float64)
        s = torch.empty((B, N), dtype=torch.float64)
        piv = torch.empty(G * _LANES, dtype=torch.float64)
        if B and N:
            ins, strides = _flat_inputs(p)
            lib.tm_assemble(_dims(p), _ptrs(ins), strides, self.ab.data_ptr(), b.data_ptr())
            lib.tm_band_factor_scaled(B, N, self.kd, self.ab.data_ptr(), self.inv.data_ptr(), s.data_ptr(),
                                      piv.data_ptr())
        self.min_pivot = _smallest_pivot(piv[:B], min_pivot)
        return self, b.reshape(bs + (T, n)), s.reshape(bs + (T, n))

    def solve(self, x: Tensor) -> Tensor:
        """M^{-1} x for x (..., T, n, c) (float64, CPU)."""
        c = x.shape[-1]
        N = self.T * self.n
        r = x.detach().resolve_neg().expand(self.batch_shape + x.shape[-3:]).reshape(self.B, N, c)
        out = torch.empty((self.B, N, c), dtype=torch.float64)
        if self.B and N and c:
            work = torch.empty(N * c * _LANES, dtype=torch.float64)
            _load().tm_band_solve(self.ab.data_ptr(), self.inv.data_ptr(), self.B, N, self.kd, c, r.data_ptr(),
                                  _strides(r), out.data_ptr(), work.data_ptr())
        return out.reshape(self.batch_shape + (self.T, self.n, c))


def objective_grads(p, lam: Tensor, lam_eps: Tensor | None, u: Tensor, eps: Tensor | None,
                    need: list[bool]) -> list[Tensor | None] | None:
    """system.objective_cross_grads computed by the C library (tm_objective_grads), or None where it does not
    apply (no library, not float64 on the CPU, an empty batch): the same gradients, in one pass over the grid
    instead of ~40 tensor operations on (..., T, D, K) tensors whose last axis is tiny."""
    bs = p.batch_shape
    B = math.prod(bs)
    if lam.device.type != "cpu" or lam.dtype != torch.float64 or B == 0:
        return None  # (decided before _load: a CUDA backward never compiles the library)
    lib = _load()
    if lib is None:
        return None
    T, E, D, K, T0, K0 = p.T, p.E, p.D, p.K, p.T0, p.K0
    (c, rhs, init, h, we, wi, ws, C), strides = _flat_inputs(p)
    lam_c = lam.detach().resolve_neg().reshape((B, T, D, K)).contiguous()
    u_c = u.detach().resolve_neg().reshape((B, T, D, K)).contiguous()
    le = None if lam_eps is None else lam_eps.detach().resolve_neg().reshape(B).contiguous()
    e = None if eps is None else eps.detach().resolve_neg().reshape(B).contiguous()
    has_init = T0 > 0 and K0 > 0
    want = [need[0], need[1], need[2] and has_init, need[3], need[4], need[5] and has_init, need[6]]
    shapes = [(B, T, E, D, K), (B, T, E), (B, T0, D, K0), (B, T - 1), (B,), (B,), (B,)]
    outs = [torch.empty(s, dtype=torch.float64) if wt else None for s, wt in zip(shapes, want)]
    lib.tm_objective_grads(_dims(p), _ptrs([lam_c, u_c, c, rhs, init, h, we, wi, ws, le, e, C]), strides, _ptrs(outs))
    like = p.tensors()
    core = [(T, E, D, K), (T, E), (T0, D, K0), (T - 1,), (), (), ()]
    res: list[Tensor | None] = [None if g is None else g.reshape(bs + cr).sum_to_size(x.shape)
                                for g, cr, x in zip(outs, core, like)]
    if p.slack is not None:
        res.append(lam_eps.sum_to_size(p.slack.shape) if need[7] else None)
    return res
