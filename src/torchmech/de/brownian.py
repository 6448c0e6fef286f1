"""Brownian motion for SDE solvers: BrownianInterval (exact, cached) and VirtualBrownianTree (constant memory)."""

from __future__ import annotations

import bisect
import math
import warnings
import struct
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["AbstractBrownian", "BrownianInterval", "VirtualBrownianTree", "BrownianIncrement"]

_MASK64 = (1 << 64) - 1


def _mix(seed: int, k: int) -> int:
    """SplitMix64 of ``seed`` and a stream index ``k``: a child seed in [0, 2**63)."""
    z = (seed + 0x9E3779B97F4A7C15 * (k + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class BrownianIncrement(tuple):
    """``(W, H)``: Brownian increment and space-time Levy area over an interval, each of ``shape``.

    ``H = (1/h) int_s^u (W_r - W_s - (r - s)/h W_{s,u}) dr`` with ``h = u - s``; ``H ~ N(0, h/12)``
    independent of ``W``. The double integral ``int_s^u (W_r - W_s) dr = h (W/2 + H)``.

    ``A`` (attribute; None unless the Brownian motion was built with ``levy_area="davie"`` or
    ``"foster"``): approximate space-space Levy area between the channels of the last axis,
    shape ``shape + (shape[-1],)``, ``A[..., i, j] ~ 1/2 int_s^u (W^i_{s,r} dW^j_r - W^j_{s,r} dW^i_r)``
    (antisymmetric, zero diagonal). Unpacking stays ``W, H = increment``.
    """

    def __new__(cls, W: Tensor, H: Tensor, A: Tensor | None = None):
        obj = tuple.__new__(cls, (W, H))
        obj.A = A
        return obj

    @property
    def W(self) -> Tensor:
        return self[0]

    @property
    def H(self) -> Tensor:
        return self[1]


def _split(W: Tensor, H: Tensor | None, h1: float, h2: float, Z: Tensor):
    """Exact conditional split of an interval of length ``h1 + h2`` with increment ``W`` (and
    Levy area ``H``) at an interior point, using fresh standard normals ``Z`` ((1 or 4, *shape)).

    Returns ``(W1, H1, W2, H2)`` (``H1 = H2 = None`` without Levy area). With Levy area the
    conditional sample uses Matheron's rule on the linear relation
    ``W = W1 + W2``, ``H = (h1 H1 + h2 H2)/h + (h2 W1 - h1 W2)/(2h)``.
    """
    h = h1 + h2
    if H is None:
        W1 = (h1 / h) * W + math.sqrt(h1 * h2 / h) * Z[0]
        return W1, None, W - W1, None
    a1, b1 = math.sqrt(h1) * Z[0], math.sqrt(h1 / 12.0) * Z[1]
    a2, b2 = math.sqrt(h2) * Z[2], math.sqrt(h2 / 12.0) * Z[3]
    rW = W - (a1 + a2)
    rH = H - ((h1 * b1 + h2 * b2) / h + (h2 * a1 - h1 * a2) / (2.0 * h))
    c = 6.0 * h1 * h2 / (h * h)
    W1 = a1 + (h1 / h) * rW + c * rH
    H1 = b1 + (h1 * h1 / (h * h)) * rH
    W2 = a2 + (h2 / h) * rW - c * rH
    H2 = b2 + (h2 * h2 / (h * h)) * rH
    return W1, H1, W2, H2


def _merge(W1: Tensor, H1: Tensor | None, h1: float, W2: Tensor, H2: Tensor | None, h2: float):
    """Increment and Levy area of the union of two adjacent intervals (inverse of :func:`_split`)."""
    W = W1 + W2
    if H1 is None:
        return W, None
    h = h1 + h2
    return W, (h1 * H1 + h2 * H2) / h + (h2 * W1 - h1 * W2) / (2.0 * h)


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    """``a + b`` with None standing for zero."""
    return b if a is None else a + b


_LEVY_KINDS = (None, "space-time", "davie", "foster")


def _check_levy(levy_area: Any, name: str) -> str | None:
    """Normalised Levy-area kind: None, "space-time", "davie" or "foster"."""
    if levy_area is None or levy_area is False:
        return None
    if levy_area is True or levy_area in ("space-time", "space_time"):
        return "space-time"
    if levy_area in ("davie", "foster"):
        return levy_area
    raise ValueError(f"{name}: levy_area must be one of {list(_LEVY_KINDS)}, got {levy_area!r}")


def _interval_seed(seed: int, s: float, u: float) -> int:
    """A seed that depends only on the interval [s, u] (so a re-query draws the same normals)."""
    bs, bu = struct.unpack("<qq", struct.pack("<dd", s, u))
    return _mix(_mix(seed ^ 0x5EED5EED5EED5EED, bs & _MASK64), bu & _MASK64)


def _space_space_area(kind: str, W: Tensor, H: Tensor, h: float, Z: Tensor) -> Tensor:
    """Davie's or Foster's approximation of the space-space Levy area from ``W``, ``H`` ((..., d))
    and standard normals ``Z`` ((..., d, d), only the strict upper triangle is used).

    Both are ``A_ij = H_i W_j - W_i H_j + sigma_ij lambda_ij`` with ``lambda_ij = -lambda_ji``
    standard normal for ``i < j``. The first part has variance ``h^2/6``; the Levy area has
    ``h^2/4``, so the Gaussian part supplies ``h^2/12`` on average:

    - Davie (2014): ``sigma_ij^2 = h^2/12`` (independent of ``W`` and ``H``).
    - Foster (2020, thesis; github.com/james-m-foster/levy-area-simulation):
      ``sigma_ij^2 = h^2/20 + h (H_i^2 + H_j^2)/5`` (mean ``h^2/12`` since ``E H^2 = h/12``): the
      conditional variance of the Levy area given ``H``. Foster also draws ``lambda`` from a
      logistic/normal mixture to match the fourth moment; here ``lambda`` is Gaussian.
    """
    Hi, Wj = H.unsqueeze(-1), W.unsqueeze(-2)
    base = Hi * Wj - W.unsqueeze(-1) * H.unsqueeze(-2)
    if kind == "davie":
        sig = torch.full_like(base, h / math.sqrt(12.0))
    else:
        H2 = H * H
        sig = torch.sqrt(h * h / 20.0 + (h / 5.0) * (H2.unsqueeze(-1) + H2.unsqueeze(-2)))
    up = torch.triu(sig * Z, diagonal=1)
    return base + up - up.transpose(-1, -2)


class AbstractBrownian:
    """A Brownian motion on ``[t0, t1]`` with samples of ``shape`` (leading axis = batch).

    Use as the control of a :class:`~torchmech.de.terms.ControlTerm`: ``evaluate(s, u)`` (or
    ``bm(s, u)``) returns the increment ``W(u) - W(s)`` of ``shape``. ``s`` and ``u`` are floats,
    0-d tensors, or per-sample (B,) tensors with ``B == shape[0]`` (row ``b`` of the result is the
    increment over sample ``b``'s interval). ``u < s`` gives ``-(W(s) - W(u))``.
    With ``levy_area=True`` it returns a :class:`BrownianIncrement` ``(W, H)``.
    """

    t0: float
    t1: float
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    has_levy_area: bool

    def _query(self, s: float, u: float, levy: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_common(self, name, t0, t1, shape, dtype, device, seed):
        try:
            t0, t1 = float(t0), float(t1)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: t0 and t1 must be real numbers, got {t0!r}, {t1!r}") from exc
        if not (math.isfinite(t0) and math.isfinite(t1)) or not t0 < t1:
            raise ValueError(f"{name}: need finite t0 < t1, got t0={t0}, t1={t1}")
        if isinstance(shape, int):
            shape = (shape,)
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError as exc:
            raise TypeError(f"{name}: shape must be a tuple of ints, got {shape!r}") from exc
        if len(shape) == 0 or any(s < 1 for s in shape):
            raise ValueError(f"{name}: shape must be a non-empty tuple of positive ints, got {shape}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{name}: dtype must be a floating torch.dtype, got {dtype!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{name}: seed must be an int or None, got {type(seed).__name__}")
        self.t0, self.t1, self.shape, self.dtype = t0, t1, shape, dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.seed = seed & _MASK64
        self._gen = torch.Generator(device=self.device)

    def _normals(self, seed: int, k: int) -> Tensor:
        self._gen.manual_seed(seed)
        return torch.randn((k,) + self.shape, generator=self._gen, dtype=self.dtype, device=self.device)

    def _check_t(self, t: float, name: str) -> float:
        """t, snapped onto [t0, t1] when it lies outside by no more than float32 rounding, else an error.

        A solve in float32 queries its end time as a float32 number: t1 = 0.1 arrives as 0.10000000149,
        just past the interval, and must still mean t1.
        """
        if self.t0 <= t <= self.t1:
            return t
        slack = 16 * torch.finfo(torch.float32).eps * max(abs(self.t0), abs(self.t1), self.t1 - self.t0)
        if self.t0 - slack <= t < self.t0:
            return self.t0
        if self.t1 < t <= self.t1 + slack:
            return self.t1
        raise ValueError(
            f"{type(self).__name__}: query time {name}={t!r} is outside the Brownian motion's "
            f"interval [t0, t1] = [{self.t0}, {self.t1}]"
        )

    @property
    def has_space_space_levy_area(self) -> bool:
        """True when ``evaluate(..., levy_area=True)`` also gives ``A`` (``levy_area`` davie/foster)."""
        return self.levy_area in ("davie", "foster")

    def _with_area(self, s: float, u: float, out):
        """Attach the (approximate) space-space Levy area over [s, u] (s < u) to ``(W, H)``."""
        W, H = out
        self._gen.manual_seed(_interval_seed(self.seed, s, u))
        Z = torch.randn(self.shape + (self.shape[-1],), generator=self._gen, dtype=self.dtype, device=self.device)
        return BrownianIncrement(W, H, _space_space_area(self.levy_area, W, H, u - s, Z))

    def _scalar(self, s: float, u: float, levy: bool):
        s = self._check_t(s, "t0")
        u = self._check_t(u, "t1")
        area = levy and self.has_space_space_levy_area
        if s == u:
            z = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            if not levy:
                return z
            return BrownianIncrement(z, z.clone(), z.new_zeros(self.shape + (self.shape[-1],)) if area else None)
        if u < s:
            out = self._query(u, s, levy)
            if not levy:
                return -out
            if area:  # the reversed path: increment and area change sign, H does not
                A = self._with_area(u, s, out).A
                return BrownianIncrement(-out[0], out[1], -A)
            return BrownianIncrement(-out[0], out[1])
        out = self._query(s, u, levy)
        return self._with_area(s, u, out) if area else out

    def evaluate(self, t0: Any, t1: Any = None, levy_area: bool = False):
        """Increment ``W(t1) - W(t0)`` (``W(t0) - W(self.t0)`` if ``t1`` is None), of ``shape``.

        Queries run outside ``torch.inference_mode`` (the increments are cached: an inference tensor in the
        cache would break the backward pass of a later solve on the same path).

        Args:
            t0, t1: floats, 0-d tensors or per-sample (B,) tensors with ``B == shape[0]``.
            levy_area: also return the space-time Levy area; needs ``levy_area`` at construction.
                Returns a :class:`BrownianIncrement` ``(W, H)`` then, with the approximate
                space-space Levy area as its ``A`` for ``levy_area="davie"``/``"foster"``.
        """
        with torch.inference_mode(False):
            return self._evaluate(t0, t1, levy_area)

    def _evaluate(self, t0: Any, t1: Any, levy_area: bool):
        if levy_area and not self.has_levy_area:
            raise ValueError(f"{type(self).__name__}: Levy area requested but the Brownian motion was built "
                             "with levy_area=None; pass levy_area='space-time' (or 'davie'/'foster')")
        if t1 is None:
            t0, t1 = self.t0, t0
        s_vec = isinstance(t0, Tensor) and t0.dim() > 0
        u_vec = isinstance(t1, Tensor) and t1.dim() > 0
        if not (s_vec or u_vec):
            return self._scalar(float(t0), float(t1), levy_area)
        B = self.shape[0]
        ss = t0.detach().reshape(-1) if s_vec else None
        uu = t1.detach().reshape(-1) if u_vec else None
        for name, v in (("t0", ss), ("t1", uu)):
            if v is not None and v.shape[0] != B:
                raise ValueError(f"{type(self).__name__}.evaluate: per-sample {name} must have shape (B,) = "
                                 f"({B},) matching shape[0], got {tuple(v.shape)}")
        ss = ss if ss is not None else torch.full((B,), float(t0), dtype=torch.float64)
        uu = uu if uu is not None else torch.full((B,), float(t1), dtype=torch.float64)
        pairs = torch.stack([ss.to(torch.float64), uu.to(torch.float64)], dim=1).cpu()
        if not torch.isfinite(pairs).all():
            raise ValueError(f"{type(self).__name__}.evaluate: query times must be finite")
        if bool((pairs == pairs[:1]).all()):
            return self._scalar(float(pairs[0, 0]), float(pairs[0, 1]), levy_area)
        uniq, inv = torch.unique(pairs, dim=0, return_inverse=True)
        # samples stepping apart (adaptive per-sample steps) work on that many places of the path;
        # keep more pieces then (a step of one sample spans pieces made by the others)
        self._spread = max(getattr(self, "_spread", 1), uniq.shape[0])
        outs = [self._scalar(float(a), float(b), levy_area) for a, b in uniq.tolist()]
        idx = inv.to(self.device)
        rows = torch.arange(B, device=self.device)
        if levy_area:
            Ws = torch.stack([o[0] for o in outs])[idx, rows]
            Hs = torch.stack([o[1] for o in outs])[idx, rows]
            As = torch.stack([o.A for o in outs])[idx, rows] if self.has_space_space_levy_area else None
            return BrownianIncrement(Ws, Hs, As)
        return torch.stack(outs)[idx, rows]

    def __call__(self, t0: Any, t1: Any = None, levy_area: bool = False):
        return self.evaluate(t0, t1, levy_area=levy_area)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(t0={self.t0}, t1={self.t1}, shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device}, levy_area={self.levy_area!r})")


class _Piece:
    """A piece of a :class:`BrownianInterval`'s path: a leaf, or an interior node once split.

    Its increment (and Levy area) is a function of its parent's values and the parent's seed
    (conditional bridge sample), or of its own seed alone for a piece created by extending the
    path to the right (an independent sample); so any piece can be regenerated after eviction.
    """

    __slots__ = ("h", "seed", "parent", "left", "depth", "h1", "__weakref__")

    def __init__(self, h: float, seed: int, parent: "_Piece | None", left: bool, depth: int):
        self.h, self.seed, self.parent, self.left, self.depth = h, seed, parent, left, depth
        self.h1 = 0.0  # once split: length of the left child


class BrownianInterval(AbstractBrownian):
    """Exact Brownian motion on ``[t0, t1]``, sampled lazily and exactly at every queried time.

    Every query ``evaluate(s, u)`` returns the exact increment ``W(u) - W(s)``. The path is
    built from pieces between the queried times: a query beyond the furthest time queried so far
    extends the path by a fresh independent increment over the new piece, and a query inside an
    existing piece splits it by sampling the Brownian bridge (and, with
    ``levy_area='space-time'``, the bridge of the space-time Levy area) conditional on that
    piece's values. Values are exactly consistent (``W(s,u) = W(s,t) + W(t,u)`` to round-off),
    identical on re-query, and reproducible from ``seed`` for the same sequence of queries (a
    different query order gives another, equally valid, sample path). A query that continues
    from the previous one (as a solver's steps do) costs one normal draw of ``shape``.

    Memory is bounded: only the values of the ``cache_size`` most recently used pieces are kept
    (plus, for long chains of splits inside one piece, every 16th level of the chain); an evicted
    piece is regenerated from its seed when queried again, which for the pieces a solver's steps
    create costs one normal draw (a solve's backward pass re-querying its steps in reverse order
    stays O(1) per step). ``cache_size=None`` keeps every piece's values. Per-sample queries over
    ``U > 1`` different intervals at once (samples with their own adaptive steps) scale the bound
    to ``16 * cache_size * U`` (the largest ``U`` seen): each sample's step then spans pieces made
    by the others' steps, so the work per query grows with ``U`` (for large batches with
    per-sample adaptive steps, ``cache_size=None`` is fastest if memory allows).

    Args:
        t0, t1: interval, ``t0 < t1``.
        shape: shape of one sample of W, e.g. ``(batch, channels)``.
        dtype, device: of the returned tensors (default: torch default dtype, CPU).
        seed: int; default draws one from torch's global generator (so ``torch.manual_seed``
            makes it reproducible). Random streams are per device type: the same seed gives
            different paths on CPU and CUDA.
        levy_area: None, ``"space-time"`` (``H`` exact), or ``"davie"``/``"foster"``: ``H`` exact
            plus an approximate space-space Levy area ``A`` (see :class:`BrownianIncrement` and
            :func:`_space_space_area` for the formulas). ``A`` comes from ``W``, ``H`` and normals
            drawn from a seed of the interval, so a re-query gives the same value; being an
            approximation, areas of adjacent intervals do not add up as exact ones would (Chen's
            relation), and it matches the true area's mean and (conditional) variance, not its law.
        cache_size: number of pieces whose values are kept (default 32), or None for all.
    """

    _PIN_EVERY = 16  # depth interval of pinned pieces along chains of splits

    def __init__(self, t0: float, t1: float, shape: Sequence[int], dtype: torch.dtype | None = None,
                 device: Any = None, seed: int | None = None, levy_area: str | None = None,
                 cache_size: int | None = 32):
        self._init_common("BrownianInterval", t0, t1, shape, dtype, device, seed)
        self.levy_area = _check_levy(levy_area, "BrownianInterval")
        self.has_levy_area = self.levy_area is not None
        if cache_size is not None and (isinstance(cache_size, bool) or not isinstance(cache_size, int)
                                       or cache_size < 2):
            raise ValueError(f"BrownianInterval: cache_size must be an int >= 2 or None, got {cache_size!r}")
        self.cache_size = cache_size
        # leaf i covers [knots[i], knots[i+1]]; knots[-1] is the furthest time sampled so far
        self._knots: list[float] = [self.t0]
        self._leaves: list[_Piece] = []
        self._cache: OrderedDict = OrderedDict()  # piece -> (W, H), least recently used first
        self._pinned: dict = {}
        self._roots = 0
        self._cursor = 0

    @property
    def num_pieces(self) -> int:
        """Number of pieces of the path sampled so far (grows with distinct query points)."""
        return len(self._leaves)

    # -- values of pieces ------------------------------------------------------------------
    def _store(self, piece: _Piece, W: Tensor, H: Tensor | None) -> None:
        if piece.depth and piece.depth % self._PIN_EVERY == 0:
            self._pinned[piece] = (W, H)
            return
        cache = self._cache
        cache[piece] = (W, H)
        cache.move_to_end(piece)
        spread = getattr(self, "_spread", 1)
        if self.cache_size is not None and len(cache) > self.cache_size * (1 if spread == 1 else 16 * spread):
            cache.popitem(last=False)

    def _lookup(self, piece: _Piece):
        got = self._pinned.get(piece)
        if got is not None:
            return got
        got = self._cache.get(piece)
        if got is not None:
            self._cache.move_to_end(piece)
        return got

    def _fresh(self, piece: _Piece):
        """Independent sample over a piece created by extending the path."""
        Z = self._normals(piece.seed, 2 if self.has_levy_area else 1)
        W = Z[0].mul_(math.sqrt(piece.h))
        H = Z[1].mul_(math.sqrt(piece.h / 12.0)) if self.has_levy_area else None
        return W, H

    def _children(self, piece: _Piece, W: Tensor, H: Tensor | None):
        """Values of the two children of a split piece, from its values and seed."""
        h1 = piece.h1
        Z = self._normals(_mix(piece.seed, 0), 4 if self.has_levy_area else 1)
        return _split(W, H, h1, piece.h - h1, Z)

    def _values(self, piece: _Piece):
        """(W, H) of a piece: cached, or regenerated from the nearest ancestor with known values."""
        got = self._lookup(piece)
        if got is not None:
            return got
        chain = []
        node = piece
        while got is None and node.parent is not None:
            chain.append(node)
            node = node.parent
            got = self._lookup(node)
        if got is None:  # a root: regenerate from its seed
            got = self._fresh(node)
            self._store(node, *got)
        W, H = got
        for child in reversed(chain):
            parent = child.parent
            W1, H1, W2, H2 = self._children(parent, W, H)
            W, H = (W1, H1) if child.left else (W2, H2)
            self._store(child, W, H)
        return W, H

    # -- structure -------------------------------------------------------------------------
    def _extend(self, t: float) -> int:
        """Extend the path from its furthest time to ``t`` with one new piece; index of knot ``t``."""
        piece = _Piece(t - self._knots[-1], _mix(self.seed, 1 + self._roots), None, True, 0)
        self._roots += 1
        self._store(piece, *self._fresh(piece))
        self._knots.append(t)
        self._leaves.append(piece)
        return len(self._knots) - 1

    def _find(self, t: float) -> int:
        """Index of the knot equal to ``t`` (extending the path or splitting a piece if needed)."""
        k = self._knots
        if t > k[-1]:
            return self._extend(t)
        c = self._cursor
        if c < len(k) and k[c] == t:
            return c
        if c + 1 < len(k) and k[c + 1] == t:
            return c + 1
        if c + 1 < len(k) and k[c] < t < k[c + 1]:
            i = c
        else:
            j = bisect.bisect_left(k, t)
            if k[j] == t:
                return j
            i = j - 1
        # split piece i = [k[i], k[i+1]] at t
        piece = self._leaves[i]
        W, H = self._values(piece)
        piece.h1 = t - k[i]
        W1, H1, W2, H2 = self._children(piece, W, H)
        left = _Piece(piece.h1, _mix(piece.seed, 1), piece, True, piece.depth + 1)
        right = _Piece(piece.h - piece.h1, _mix(piece.seed, 2), piece, False, piece.depth + 1)
        self._store(left, W1, H1)
        self._store(right, W2, H2)
        k.insert(i + 1, t)
        self._leaves[i:i + 1] = [left, right]
        return i + 1

    def _query(self, s: float, u: float, levy: bool):
        i = self._find(s)
        j = self._find(u)  # u > s: inserting u never shifts the index of s
        self._cursor = j
        leaves, knots = self._leaves, self._knots
        W, H = self._values(leaves[i])
        hacc = knots[i + 1] - knots[i]
        for m in range(i + 1, j):
            Wm, Hm = self._values(leaves[m])
            hm = knots[m + 1] - knots[m]
            W, H = _merge(W, H, hacc, Wm, Hm, hm)
            hacc += hm
        if levy:
            return BrownianIncrement(W, H)
        return W


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel of the first frame outside torchmech and torch (the user's call, also
    when it went through an ``nn.Module``)."""
    import sys

    def inside(name: str) -> bool:
        return name == "torch" or name.startswith(("torchmech", "torch."))

    frame, level = sys._getframe(1), 1
    while frame is not None and inside(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    return level


_SHORT_STEPS = 30  # VirtualBrownianTree warns below this many tol: the variance shortfall tol / (3 h) > 1%


class VirtualBrownianTree(AbstractBrownian):
    """Brownian motion with constant memory: values are regenerated from the seed on each query.

    ``W(t)`` is found by bisecting ``[t0, t1]`` down to pieces of length ``<= tol``, sampling each
    midpoint exactly (Brownian bridge, and the Levy-area bridge with ``levy_area='space-time'``)
    from seeds that depend only on the node, so any query order gives the same path. Inside a
    final piece the path is the conditional mean given that piece's increment (and Levy area):
    values at the dyadic grid of spacing ~``tol`` are exact, and the path between them is an
    O(sqrt(tol)) approximation: an increment over h that is not aligned with that grid has variance
    about ``h - tol / 3`` instead of ``h`` (warned once when ``h < 30 tol``, i.e. more than ~1% is missing;
    an Ito solve then drifts by about that fraction of its noise-induced drift). Increments are exactly
    consistent (``W(s,u) = W(u) - W(s)``);
    the Levy area is that of the returned (piecewise polynomial) path. A query costs at most
    O(log2((t1 - t0) / tol)) normal draws of ``shape``; the nodes shared with the previous
    query's bisection path are kept, so a query near the previous one only samples the levels
    below the node they share (about log2(distance / tol) of them). The tree arithmetic runs in
    float64; the standard normal draws are generated in float32 (several times cheaper on CPU),
    so float32 and float64 trees with the same seed give the same path.

    Args:
        t0, t1, shape, dtype, device, seed, levy_area: as :class:`BrownianInterval`.
        tol: resolution of the dyadic tree (default ``(t1 - t0) * 2**-24``, 6e-8 on [0, 1]: steps of 1e-5
            miss 0.2% of their variance; ``2**-16`` missed 5% at steps of 1e-4).
    """

    def __init__(self, t0: float, t1: float, shape: Sequence[int], tol: float | None = None,
                 dtype: torch.dtype | None = None, device: Any = None, seed: int | None = None,
                 levy_area: str | None = None):
        self._init_common("VirtualBrownianTree", t0, t1, shape, dtype, device, seed)
        self.levy_area = _check_levy(levy_area, "VirtualBrownianTree")
        self.has_levy_area = self.levy_area is not None
        span = self.t1 - self.t0
        tol = span * 2.0 ** -24 if tol is None else tol
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not (0 < tol):
            raise ValueError(f"VirtualBrownianTree: tol must be a positive float, got {tol!r}")
        self.tol = float(tol)
        self.depth = max(0, math.ceil(math.log2(span / self.tol)))
        Z = self._normals64(_mix(self.seed, 0), 2)
        self._root_W = math.sqrt(span) * Z[0]
        self._root_H = math.sqrt(span / 12.0) * Z[1] if self.has_levy_area else None
        self._cache: dict[float, tuple[Tensor, Tensor | None]] = {}
        # the bisection path of the last query: level k = (lo, hi, W, H, seed, W(lo), int_{t0}^{lo} W),
        # None standing for zero
        self._path: list[tuple] = [(self.t0, self.t1, self._root_W, self._root_H, _mix(self.seed, 1), None, None)]
        self._last: float | None = None
        self._warned = False

    def _normals64(self, seed: int, k: int) -> Tensor:
        self._gen.manual_seed(seed)
        z = torch.randn((k,) + self.shape, generator=self._gen, dtype=torch.float32, device=self.device)
        return z.to(torch.float64)

    def _point(self, t: float) -> tuple[Tensor, Tensor | None]:
        """(W(t) - W(t0), int_{t0}^t (W(r) - W(t0)) dr (None without Levy area)), float64."""
        if t in self._cache:
            return self._cache[t]
        levy = self.has_levy_area
        path = self._path
        # resume from the node of the previous path where a bisection from the root would be: the
        # deepest one containing t strictly inside, or the first one with t as an end point (the
        # bisection below a node does not depend on how it was reached)
        k = 0
        while path[k][0] != t != path[k][1] and k + 1 < len(path) and path[k + 1][0] <= t <= path[k + 1][1]:
            k += 1
        lo, hi, W, H, seed, Wl, Il = path[k]
        del path[k + 1:]
        # keep the path only down to about the level of the query spacing: deeper nodes are not
        # shared with the next query (and each level holds tensors of ``shape``)
        gap = abs(t - self._last) if self._last is not None else self.t1 - self.t0
        keep = math.ceil(math.log2((self.t1 - self.t0) / max(gap, self.tol)))
        self._last = t
        for _ in range(k, self.depth):
            if t == lo or t == hi:
                break
            mid = 0.5 * (lo + hi)
            h1, h2 = mid - lo, hi - mid
            if not levy:  # _split's bridge sample, computing only the child that contains t
                self._gen.manual_seed(_mix(seed, 0))
                Z = torch.randn(self.shape, generator=self._gen, dtype=torch.float32, device=self.device)
                W1 = torch.mul(W, h1 / (h1 + h2)).add_(Z, alpha=math.sqrt(h1 * h2 / (h1 + h2)))
                if t < mid:
                    W, hi, seed = W1, mid, _mix(seed, 1)
                else:
                    W, lo, seed = W - W1, mid, _mix(seed, 2)
                    Wl = _add(Wl, W1)
                if len(path) < keep:
                    path.append((lo, hi, W, None, seed, Wl, None))
                continue
            Z = self._normals64(_mix(seed, 0), 4)
            W1, H1, W2, H2 = _split(W, H, h1, h2, Z)
            if t < mid:
                W, H, hi, seed = W1, H1, mid, _mix(seed, 1)
            else:
                Il = _add(Il, h1 * _add(Wl, 0.5 * W1 + H1))
                Wl = _add(Wl, W1)
                W, H, lo, seed = W2, H2, mid, _mix(seed, 2)
            if len(path) < keep:
                path.append((lo, hi, W, H, seed, Wl, Il))
        h = hi - lo
        x = t - lo
        # conditional-mean path inside the final piece: Wl + (x/h) W + 6 x (h - x)/h^2 H
        Wt = _add(Wl, (x / h) * W)
        It = None
        if levy:
            It = _add(Il, _add(None if Wl is None else x * Wl, (x * x / (2 * h)) * W))
            Wt = Wt + (6.0 * x * (h - x) / (h * h)) * H
            It = It + (6.0 * (h * x * x / 2.0 - x ** 3 / 3.0) / (h * h)) * H
        if len(self._cache) >= 2:
            self._cache.pop(next(iter(self._cache)))
        self._cache[t] = (Wt, It)
        return Wt, It

    def _query(self, s: float, u: float, levy: bool):
        if u - s < _SHORT_STEPS * self.tol and not self._warned:
            self._warned = True
            warnings.warn(
                f"VirtualBrownianTree: an increment over h = {u - s:.3g} is within {_SHORT_STEPS} x tol = "
                f"{self.tol:.3g}; between the tree's nodes the path is its conditional mean, so such an increment "
                f"misses about tol / (3 h) = {self.tol / (3 * (u - s)):.1%} of its variance (Ito solves drift); "
                "pass a smaller tol", stacklevel=_caller_level())
        Ws, Is = self._point(s)
        Wu, Iu = self._point(u)
        W = Wu - Ws
        if not levy:
            return W.to(self.dtype)
        h = u - s
        H = (Iu - Is) / h - Ws - 0.5 * W
        return BrownianIncrement(W.to(self.dtype), H.to(self.dtype))


class WithZeroChannel:
    """A Brownian motion with one extra channel that stays zero (its space-time Levy area padded alike).

    For augmented states whose last component has no noise: the log-ratio of ``sdeint(logqp=True)`` and the
    KL accumulator of :class:`~torchmech.nn.LatentSDE`.
    """

    def __init__(self, bm: Any):
        self.bm = bm
        self.has_levy_area = getattr(bm, "has_levy_area", False)

    @staticmethod
    def _pad(w: Tensor) -> Tensor:
        return torch.cat([w, torch.zeros_like(w[:, :1])], dim=-1)

    def evaluate(self, t0: Any, t1: Any = None, levy_area: bool = False):
        if levy_area:
            W, H = self.bm.evaluate(t0, t1, levy_area=True)
            return self._pad(W), self._pad(H)
        return self._pad(self.bm.evaluate(t0, t1))
