"""The C banded Cholesky (method="native"): builds here, agrees with LAPACK and dense solves, falls back cleanly."""

import os
import subprocess
import sys

import pytest
import torch

from torchmech.mnn import solve_linear_ode
from torchmech.mnn.linalg import native
from torchmech.mnn.linalg.blocktri import FactorizationError
from torchmech.mnn.linalg.lapack import LapackBanded

f64 = torch.float64


def test_builds_on_this_machine():
    # CI and the development machines have a C compiler: a broken build must fail here, not fall back unnoticed
    if os.environ.get("TORCHMECH_NATIVE", "1") == "0":
        pytest.skip("disabled by TORCHMECH_NATIVE=0")
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() == ""


def _banded(bs, T, n, nblk, seed):
    """Random SPD block-banded blocks (diag, off1, off2 or None), the scaling s, and the dense S M S."""
    g = torch.Generator().manual_seed(seed)
    N = T * n
    A = torch.randn(*bs, N, N, generator=g, dtype=f64)
    idx = torch.arange(N) // n
    A = (A + A.mT) * ((idx[:, None] - idx[None, :]).abs() < nblk) + 4 * nblk * n * torch.eye(N, dtype=f64)
    A = A * (1 + torch.rand(*bs, N, 1, generator=g, dtype=f64))  # rows of different scales ...
    A = (A + A.mT) / 2  # ... kept symmetric
    blk = [torch.stack([A[..., t * n:(t + 1) * n, (t + k) * n:(t + k + 1) * n] for t in range(T - k)], -3)
           if T > k else A.new_zeros(bs + (0, n, n)) for k in range(nblk)]
    s = A.diagonal(dim1=-2, dim2=-1).rsqrt().reshape(bs + (T, n))
    S = s.reshape(bs + (N,))
    return blk, s, S[..., :, None] * A * S[..., None, :]


@pytest.mark.parametrize("bs", [(), (1,), (3,), (9,), (2, 5), (17,)])
@pytest.mark.parametrize("T,n,nblk", [(1, 3, 3), (2, 3, 3), (7, 3, 3), (5, 1, 2), (6, 2, 2), (9, 4, 3)])
def test_matches_dense_and_lapack(bs, T, n, nblk):
    blk, s, A = _banded(bs, T, n, nblk, seed=T * 100 + n * 10 + nblk)
    off2 = blk[2] if nblk == 3 else None
    fac = native.NativeBanded(blk[0], blk[1], off2, s, min_pivot=0.0)
    r = torch.randn(bs + (T, n, 2), dtype=f64)
    x = fac.solve(r)
    ref = torch.linalg.solve(A, r.reshape(bs + (T * n, 2))).reshape(r.shape)
    assert x.shape == r.shape
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12)
    if T > 1:  # LAPACK's factor of the same scaled blocks: the same smallest pivot
        S = s.unsqueeze(-1)
        scaled = [b * S[..., :T - k, :, :] * S[..., k:, :, :].mT for k, b in enumerate(blk)]
        lap = LapackBanded(scaled[0], scaled[1], scaled[2] if nblk == 3 else None, min_pivot=0.0)
        assert fac.min_pivot == pytest.approx(lap.min_pivot, rel=1e-10)


def test_strided_and_broadcast_inputs_need_no_copy():
    # transposed (structure-of-arrays) storage and a batch axis broadcast by expand give the same factor
    blk, s, _ = _banded((4,), 6, 3, 3, seed=1)
    soa = [b.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1) for b in blk]
    assert not soa[0].is_contiguous()
    r = torch.randn(4, 6, 3, 1, dtype=f64)
    x = native.NativeBanded(*blk, s, 0.0).solve(r)
    torch.testing.assert_close(native.NativeBanded(*soa, s, 0.0).solve(r), x, rtol=0, atol=0)
    one = [b[:1].expand(4, -1, -1, -1) for b in blk]
    x1 = native.NativeBanded(*one, s[:1].expand(4, -1, -1), 0.0).solve(r)
    ref = native.NativeBanded(*[b[:1] for b in blk], s[:1], 0.0).solve(r[:1].clone())
    torch.testing.assert_close(x1[:1], ref, rtol=0, atol=0)


def test_solve_leaves_its_input_alone():
    blk, s, _ = _banded((3,), 5, 3, 3, seed=2)
    r = torch.randn(3, 5, 3, 2, dtype=f64)
    r0 = r.clone()
    native.NativeBanded(*blk, s, 0.0).solve(r)
    assert torch.equal(r, r0)


@pytest.mark.parametrize("bad", ["negative", "nan", "singular"])
def test_breakdown_raises(bad):
    blk, s, _ = _banded((9,), 6, 3, 3, seed=3)
    if bad == "negative":
        blk[0][8, 4, 1, 1] = -blk[0][8, 4, 1, 1]  # the last lane of the second group
    elif bad == "nan":
        blk[1][2, 3, 0, 2] = float("nan")
    else:  # two equal rows and columns: singular, though rounding may leave a tiny positive pivot
        blk[0][5, 2, 1, :] = blk[0][5, 2, 0, :]
        blk[0][5, 2, :, 1] = blk[0][5, 2, :, 0]
        for k in (1, 2):
            blk[k][5, 2, 1, :] = blk[k][5, 2, 0, :]
        for k in (1, 2):
            blk[k][5, 2 - k, :, 1] = blk[k][5, 2 - k, :, 0]
        s[5, 2, 1] = s[5, 2, 0]
    with pytest.raises(FactorizationError, match="Cholesky factorisation of the NeuRLP normal matrix broke down"):
        native.NativeBanded(*blk, s, min_pivot=1e-12)


def test_auto_picks_native_on_cpu():
    from torchmech.mnn.solve import _choose
    from torchmech.mnn.system import prepare

    def problem(B, T):
        return prepare(torch.randn(B, 1, 1, 1, 3, dtype=f64), torch.randn(B, 1, 1, dtype=f64),
                       torch.randn(B, 1, 1, 2, dtype=f64), torch.full((B, T - 1), 0.1, dtype=f64))

    assert _choose("auto", problem(2, 2000)) == "lapack"  # on a long grid most of the C sweep's 8 lanes idle
    want = "native" if native.available() else "lapack"
    assert _choose("auto", problem(2, 1500)) == want
    assert _choose("auto", problem(3, 2000)) == want


def _run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


_FALLBACK = """
import torch
from torchmech.mnn import solve_linear_ode
from torchmech.mnn.linalg import native
args = (torch.randn(3, 20, 1, 1, 3, dtype=torch.float64), torch.randn(3, 20, 1, dtype=torch.float64),
        torch.randn(3, 1, 1, 2, dtype=torch.float64), torch.full((3, 19), 0.1, dtype=torch.float64))
print("available", native.available())
print("reason", native.unavailable_reason())
args = [a.requires_grad_() for a in args]
u = solve_linear_ode(*args)  # auto: another backend; its backward: the tensor-op gradients
ref = solve_linear_ode(*args, method="dense")
assert torch.allclose(u, ref, rtol=1e-9, atol=1e-12)
probe = torch.randn(u.shape, dtype=torch.float64)
for a, b in zip(torch.autograd.grad((u * probe).sum(), args), torch.autograd.grad((ref * probe).sum(), args)):
    assert torch.allclose(a, b, rtol=1e-8, atol=1e-10 * b.abs().max().item())
print("gradients match")
try:
    solve_linear_ode(*args, method="native")
except RuntimeError as exc:
    print("error", exc)
"""


def test_disabled_by_environment_falls_back():
    res = _run(_FALLBACK, TORCHMECH_NATIVE="0")
    assert res.returncode == 0, res.stderr
    assert "available False" in res.stdout and "gradients match" in res.stdout
    assert "error method='native' is unavailable: disabled by TORCHMECH_NATIVE=0" in res.stdout


def test_broken_compiler_falls_back(tmp_path):
    # a compiler that fails: the reason names it; nothing half-built is left in the cache
    res = _run(_FALLBACK, CC="false", TORCHMECH_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "available False" in res.stdout
    assert "`false` failed to compile neurlp.c" in res.stdout
    assert list(tmp_path.iterdir()) == []
    res = _run(_FALLBACK, CC="true", TORCHMECH_CACHE_DIR=str(tmp_path))  # "succeeds" without writing anything
    assert "reason `true` wrote no library for neurlp.c" in res.stdout, res.stdout + res.stderr
    assert list(tmp_path.iterdir()) == []
    res = _run(_FALLBACK, CC="no-such-compiler-here", TORCHMECH_CACHE_DIR=str(tmp_path))
    assert "reason no C compiler found" in res.stdout, res.stdout + res.stderr


def test_builds_into_the_cache_once(tmp_path):
    code = ("from torchmech.mnn.linalg import native; assert native.available(), native.unavailable_reason(); "
            "print(sorted(p.name for p in native._cache_dir().iterdir()))")
    if os.environ.get("TORCHMECH_NATIVE", "1") == "0":
        pytest.skip("disabled by TORCHMECH_NATIVE=0")
    first = _run(code, TORCHMECH_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    libs = [p for p in tmp_path.iterdir()]
    assert len(libs) == 1 and libs[0].suffix == ".so"
    stamp = libs[0].stat().st_mtime_ns
    second = _run(code, TORCHMECH_CACHE_DIR=str(tmp_path))
    assert second.returncode == 0 and second.stdout == first.stdout
    assert libs[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_gradients_match_lapack_at_batch_sizes_around_the_lane_width():
    for B in (1, 7, 8, 9, 16):
        g = torch.Generator().manual_seed(B)
        args = [torch.randn(B, 12, 1, 2, 3, generator=g, dtype=f64), torch.randn(B, 12, 1, generator=g, dtype=f64),
                torch.randn(B, 1, 2, 2, generator=g, dtype=f64),
                0.05 + 0.1 * torch.rand(B, 11, generator=g, dtype=f64)]
        w = torch.randn(B, 12, 2, 3, generator=g, dtype=f64)
        grads = []
        for method in ("native", "lapack"):
            xs = [a.clone().requires_grad_() for a in args]
            (solve_linear_ode(*xs, method=method) * w).sum().backward()
            grads.append([x.grad for x in xs])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)  # (steps: ill-conditioned, ~1e-9 apart)


@pytest.mark.parametrize("cfg", [dict(), dict(K=2, K0=1), dict(K=4, K0=3, D=2, E=3), dict(T=2), dict(T=3, T0=0, K0=0),
                                 dict(central=False, D=3), dict(B=(2, 3)), dict(time_invariant=True),
                                 dict(const_step=True, B=(9,))])
def test_assembly_in_c_matches_the_tensor_op_assembly(cfg):
    # the right-hand side A^T W y and the scaling diag(M)^(-1/2) from tm_assemble against system.assemble, and the
    # factor's solve against LAPACK's on the blocks of system.assemble
    from torchmech.mnn.system import assemble, prepare

    g = torch.Generator().manual_seed(len(str(cfg)))
    B, T, D, K, E = cfg.get("B", (5,)), cfg.get("T", 8), cfg.get("D", 1), cfg.get("K", 3), cfg.get("E", 1)
    T0, K0 = cfg.get("T0", 1), cfg.get("K0", 2)
    Tc = 1 if cfg.get("time_invariant") else T
    args = [torch.randn(*B, Tc, E, D, K, generator=g, dtype=f64), torch.randn(*B, Tc, E, generator=g, dtype=f64),
            torch.randn(*B, T0, D, K0, generator=g, dtype=f64),
            0.05 + 0.2 * torch.rand(*B, 1 if cfg.get("const_step") else T - 1, generator=g, dtype=f64)]
    w = 0.5 + torch.rand(B, generator=g, dtype=f64)
    p = prepare(*args, weight_equation=w, weight_init=1.7, weight_smooth=w.flip(-1), central=cfg.get("central", True))
    sys = assemble(p)
    fac, b, s = native.NativeBanded.from_problem(p, min_pivot=0.0)
    torch.testing.assert_close(b, sys.b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, sys.diag.diagonal(dim1=-2, dim2=-1).rsqrt(), rtol=1e-12, atol=0)
    r = torch.randn(p.batch_shape + (T, p.n, 2), generator=g, dtype=f64)
    S = s.unsqueeze(-1)
    scaled = [blk * S[..., :T - k, :, :] * S[..., k:, :, :].mT
              for k, blk in enumerate([sys.diag, sys.off1] + ([sys.off2] if sys.off2 is not None else []))]
    lap = LapackBanded(scaled[0], scaled[1], scaled[2] if len(scaled) == 3 else None, min_pivot=0.0)
    ref = lap.solve(r)  # (without central rows the conditioning is worse: compare against the largest entry)
    torch.testing.assert_close(fac.solve(r), ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    assert fac.min_pivot == pytest.approx(lap.min_pivot, rel=1e-9)


@pytest.mark.parametrize("method", ["native", "lapack"])
def test_lazily_negated_inputs_are_read_as_their_values(method):
    # z.conj().imag is a view whose memory holds -values (torch negates it lazily); the C kernels read memory
    g = torch.Generator().manual_seed(4)
    c, r, i = (torch.randn(9, 20, 1, 1, 3, generator=g, dtype=f64), torch.randn(9, 20, 1, generator=g, dtype=f64),
               torch.randn(9, 1, 1, 2, generator=g, dtype=f64))
    h = torch.full((9, 19), 0.1, dtype=f64)
    neg = torch.complex(torch.zeros_like(c), -c).conj().imag
    assert neg.is_neg() and torch.equal(neg, c)
    outs = []
    for coeff in (c, neg):
        x = coeff.detach().clone() if coeff is c else coeff
        leaves = [r.clone().requires_grad_(), h.clone().requires_grad_()]
        u = solve_linear_ode(x, leaves[0], i, leaves[1], method=method)
        outs.append((u, *torch.autograd.grad(u.square().sum(), leaves)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
