"""Bad NeuRLP inputs fail loudly, with a message naming the argument and the cause."""

import re

import pytest
import torch

from torchmech.mnn import FactorizationError, solve_linear_ode

f64 = torch.float64


def problem(B=(2,), T=6, E=1, D=1, K=3, T0=1, K0=2, dtype=f64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*B, T, E, D, K, generator=g, dtype=dtype),
            torch.randn(*B, T, E, generator=g, dtype=dtype),
            torch.randn(*B, T0, D, K0, generator=g, dtype=dtype),
            torch.full((*B, T - 1), 0.1, dtype=dtype)]


NAMES = ["coefficients", "rhs", "init", "steps"]


def test_valid_problem_solves():
    u = solve_linear_ode(*problem())
    assert u.shape == (2, 6, 1, 3) and torch.isfinite(u).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", range(4))
def test_non_finite_inputs(which, bad):
    args = problem()
    args[which].view(-1)[-1] = bad
    with pytest.raises(ValueError, match=rf"^{NAMES[which]} contains 1 non-finite value\(s\)"):
        solve_linear_ode(*args)


@pytest.mark.parametrize("name", ["weight_equation", "weight_init", "weight_smooth", "slack"])
def test_non_finite_weights(name):
    with pytest.raises(ValueError, match=rf"^{name} contains 1 non-finite"):
        solve_linear_ode(*problem(), **{name: float("nan")})


@pytest.mark.parametrize("value", [0.0, -0.1])
def test_non_positive_steps(value):
    args = problem()
    args[3][1, 2] = value
    with pytest.raises(ValueError, match=rf"steps must be > 0 .* got min {value:g}$"):
        solve_linear_ode(*args)


def test_non_positive_weight():
    with pytest.raises(ValueError, match=r"weight_smooth must be > 0, got min -1"):
        solve_linear_ode(*problem(), weight_smooth=-1.0)


def test_rhs_with_wrong_number_of_equations():
    c, _, init, steps = problem(E=2)
    with pytest.raises(ValueError, match=re.escape("rhs must have shape (..., T, E) with E = 2 (from coefficients); "
                                                   "got shape (2, 6, 3)")):
        solve_linear_ode(c, torch.zeros(2, 6, 3, dtype=f64), init, steps)


def test_init_with_wrong_number_of_variables():
    c, rhs, _, steps = problem(D=2, E=2)
    with pytest.raises(ValueError, match=r"init must have shape \(\.\.\., T0, D, K0\) with D = 2 .* got shape \(2, 1, 3, 2\)"):
        solve_linear_ode(c, rhs, torch.zeros(2, 1, 3, 2, dtype=f64), steps)


def test_init_with_more_orders_than_K():
    c, rhs, _, steps = problem(K=3)
    with pytest.raises(ValueError, match=r"K0 <= K = 3 .* got shape \(2, 1, 1, 4\)"):
        solve_linear_ode(c, rhs, torch.zeros(2, 1, 1, 4, dtype=f64), steps)


def test_init_pins_more_steps_than_the_grid():
    c, rhs, _, steps = problem(T=6)
    with pytest.raises(ValueError, match=r"init pins T0 = 7 steps but the grid has only T = 6 points"):
        solve_linear_ode(c, rhs, torch.zeros(2, 7, 1, 2, dtype=f64), steps)


def test_steps_too_short():
    c, rhs, init, _ = problem(T=6)
    with pytest.raises(ValueError, match=r"steps has 4 intervals; expected 5"):
        solve_linear_ode(c, rhs, init, torch.full((2, 4), 0.1, dtype=f64))


def test_steps_one_per_point_names_steps():
    """T entries instead of T-1: the error names steps and the shape it expected, not coefficients."""
    c, rhs, init, _ = problem(T=6)
    with pytest.raises(ValueError, match=re.escape("steps has 6 intervals; expected 5 (one per interval of the "
                                                   "T = 6-point grid) or 1 (broadcast): steps must have shape "
                                                   "(..., T-1) = (..., 5) or (..., 1), got shape (2, 6)")):
        solve_linear_ode(c, rhs, init, torch.full((2, 6), 0.1, dtype=f64))
    # the same when only rhs carries the time axis
    with pytest.raises(ValueError, match=r"^steps has 6 intervals; expected 5"):
        solve_linear_ode(c[:, :1], rhs, init, torch.full((2, 6), 0.1, dtype=f64))


def test_steps_alone_decide_T_when_the_rest_broadcasts():
    c, rhs, init, _ = problem(T=6)
    u = solve_linear_ode(c[:, :1], rhs[:, :1], init, torch.full((2, 5), 0.1, dtype=f64))
    assert u.shape == (2, 6, 1, 3)


def test_rhs_time_axis_mismatch():
    c, _, init, steps = problem(T=6)
    with pytest.raises(ValueError, match=r"coefficients has 6 time points but rhs has 5; steps has 5 intervals "
                                         r"\(T = 6\): the time axes must agree"):
        solve_linear_ode(c, torch.zeros(2, 5, 1, dtype=f64), init, steps)
    with pytest.raises(ValueError, match=r"rhs has 5 time points; expected 6"):  # num_points decides
        solve_linear_ode(c, torch.zeros(2, 5, 1, dtype=f64), init, steps, num_points=6)
    with pytest.raises(ValueError, match=r"the time grid needs at least 2 points; steps has 0 intervals \(T = 1\)"):
        solve_linear_ode(c[:, :1], torch.zeros(2, 1, 1, dtype=f64), init[:, :0], torch.zeros(2, 0, dtype=f64))


def test_time_length_not_determined():
    c = torch.randn(1, 1, 1, 3, dtype=f64)
    with pytest.raises(ValueError, match=r"cannot tell the number of time points T.*pass num_points=T"):
        solve_linear_ode(c, torch.zeros(1, 1, dtype=f64), torch.zeros(1, 1, 2, dtype=f64),
                         torch.full((1,), 0.1, dtype=f64))


@pytest.mark.parametrize("which,shape,label", [
    (1, (3, 6, 1), r"rhs \(\.\.\.,T,E\) batch \(3,\)"),
    (3, (3, 5), r"steps \(\.\.\.,T-1\) batch \(3,\)"),
    (2, (4, 1, 1, 2), r"init \(\.\.\.,T0,D,K0\) batch \(4,\)"),
])
def test_batch_shapes_do_not_broadcast(which, shape, label):
    args = problem()
    args[which] = torch.ones(shape, dtype=f64)
    with pytest.raises(ValueError, match=r"batch dimensions do not broadcast: coefficients .* batch \(2,\).*" + label):
        solve_linear_ode(*args)


def test_weight_batch_does_not_broadcast():
    with pytest.raises(ValueError, match=r"weight_equation has shape \(3,\), which does not broadcast to the batch shape \(2,\)"):
        solve_linear_ode(*problem(), weight_equation=torch.ones(3, dtype=f64))


@pytest.mark.parametrize("name", ["weight_equation", "weight_smooth", "slack"])
def test_per_sample_inputs_do_not_add_batch_axes(name):
    """A (T,) weight used to become a batch axis silently (an unbatched call came back (T, T, D, K)); weights
    and slack are one value per sample."""
    c, r, i, s = problem()  # batch (2,)
    T = c.shape[-4]
    for shape in [(T,), (2, 1), (3, 1, 1)]:
        with pytest.raises(ValueError, match=rf"{name} has shape \({shape[0]},.*does not broadcast to the batch "
                                             r"shape \(2,\)"):
            solve_linear_ode(c, r, i, s, **{name: torch.ones(shape, dtype=f64)})
    solve_linear_ode(c, r, i, s, **{name: torch.full((2,), 0.5, dtype=f64)})  # one per sample is fine


def test_order_below_one():
    c = torch.randn(2, 6, 1, 1, 1, dtype=f64)
    with pytest.raises(ValueError, match=r"K = order \+ 1 and must be >= 2 .* got K = 1"):
        solve_linear_ode(c, torch.zeros(2, 6, 1, dtype=f64), torch.zeros(2, 1, 1, 1, dtype=f64),
                         torch.full((2, 5), 0.1, dtype=f64))


def test_coefficients_with_too_few_axes():
    with pytest.raises(ValueError, match=r"coefficients must have shape \(\.\.\., T, E, D, K\); got shape \(6, 1, 3\)"):
        solve_linear_ode(torch.randn(6, 1, 3, dtype=f64), *problem()[1:])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128])
def test_non_float_coefficients(dtype):
    args = problem()
    args[0] = torch.ones(args[0].shape, dtype=dtype)
    with pytest.raises(TypeError, match=rf"coefficients must be float32 or float64, got dtype {dtype}"):
        solve_linear_ode(*args)


@pytest.mark.parametrize("which", [1, 2, 3])
def test_integer_rhs_init_steps(which):
    args = problem()
    args[which] = torch.ones(args[which].shape, dtype=torch.int64)
    with pytest.raises(TypeError, match=rf"^{NAMES[which]} must be a floating-point tensor, got dtype torch.int64"):
        solve_linear_ode(*args)


def test_coefficients_not_a_tensor():
    args = problem()
    with pytest.raises(TypeError, match=r"coefficients must be a tensor .* got list"):
        solve_linear_ode(args[0].tolist(), *args[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_rejected_clearly(dtype):
    with pytest.raises(TypeError, match=rf"^coefficients must be float32 or float64, got dtype {dtype}"):
        solve_linear_ode(*(x.to(dtype) for x in problem()))


@pytest.mark.parametrize("method", ["fast", "Dense", None])
def test_unknown_method(method):
    with pytest.raises(ValueError, match=re.escape("method must be one of ('auto', 'dense', 'banded', 'parallel', 'lapack', 'native'), "
                                                   f"got {method!r}")):
        solve_linear_ode(*problem(), method=method)


def _undetermined(dtype=f64):
    """All-zero coefficients and nothing pinned: only smoothness rows, whose null space contains constants."""
    args = problem(T0=0, K0=0, dtype=dtype)
    args[0].zero_()
    return args


@pytest.mark.parametrize("central", [True, False])
@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native", "auto"])
def test_factorisation_breakdown(method, central):
    with pytest.raises(FactorizationError, match=r"Cholesky factorisation of the NeuRLP normal matrix broke down "
                                                 r"\(matrix not positive definite"):
        solve_linear_ode(*_undetermined(), method=method, central=central)


def _only_second_derivative(dtype=f64):
    """u'' = rhs with nothing pinned: values and slopes are free (linear functions are in the null space)."""
    g = torch.Generator().manual_seed(0)
    c = torch.zeros(2, 6, 1, 1, 3, dtype=dtype)
    c[..., 2] = 1.0
    return [c, torch.randn(2, 6, 1, generator=g, dtype=dtype), torch.zeros(2, 0, 1, 0, dtype=dtype),
            torch.full((2, 5), 0.1, dtype=dtype)]


@pytest.mark.parametrize("central", [True, False])
@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
def test_factorisation_breakdown_second_derivative_only(method, central):
    with pytest.raises(FactorizationError, match=r"not positive definite"):
        solve_linear_ode(*_only_second_derivative(), method=method, central=central)


@pytest.mark.parametrize("central", [True, False])
def test_factorisation_breakdown_float32_banded(central):
    with pytest.raises(FactorizationError, match=r"not positive definite"):
        solve_linear_ode(*_only_second_derivative(torch.float32), method="banded", central=central)


def test_factorisation_breakdown_float32_parallel_central():
    with pytest.raises(FactorizationError, match=r"not positive definite"):
        solve_linear_ode(*_only_second_derivative(torch.float32), method="parallel", central=True)


def test_factorisation_breakdown_float32_parallel_no_central():
    """The float32 cyclic reduction gets tiny positive pivots here (1.5e-7 of the diagonal) instead of failing;
    used as a CG preconditioner, that factor "converged" to an arbitrary member of the solution set."""
    with pytest.raises(FactorizationError, match=r"Cholesky factorisation of the NeuRLP normal matrix broke down "
                                                 r"\(matrix not positive definite in this precision"):
        solve_linear_ode(*_only_second_derivative(torch.float32), method="parallel", central=False)


_GRID = ([(dt, T, m) for dt in (torch.float32, f64) for T in (6, 7, 51, 120) for m in ("banded", "parallel", "lapack", "native")]
         + [(f64, T, m) for T in (301, 1001) for m in ("banded", "parallel", "lapack", "native")]
         + [(dt, T, "dense") for dt in (torch.float32, f64) for T in (6, 7, 51)])


@pytest.mark.parametrize("central", [True, False])
@pytest.mark.parametrize("dtype,T,method", _GRID)
def test_factorisation_breakdown_grid(dtype, T, method, central):
    """Every variant of the undetermined problems fails loudly, on several grid lengths and steps.

    Rounding often leaves small positive pivots instead of a failed Cholesky (before the relative pivot floor,
    193 of 600 such combinations returned a result silently, in both precisions). float32 is checked up to
    T = 120: the floor is capped at 1e-5 there (see system.pivot_floor), and from T ~ 300 on the float32 noise
    can exceed it (parallel, central rows, h = 0.0999)."""
    for make in (_undetermined, _only_second_derivative):
        for h in (0.1, 0.0999, 0.37):
            c, rhs, init, _ = make(dtype)
            c, rhs = c[:, :1], rhs[:, :1]  # time-invariant, so that any T works
            steps = torch.full((2, T - 1), h, dtype=dtype)
            with pytest.raises(FactorizationError, match=r"not positive definite"):
                solve_linear_ode(c, rhs, init, steps, method=method, central=central)


def test_factorisation_breakdown_with_slack():
    with pytest.raises(FactorizationError, match=r"not positive definite"):
        solve_linear_ode(*_undetermined(), method="banded", slack=1.0)


def test_factorisation_breakdown_only_pinned_orders_missing():
    """T0 = 1 but K0 = 0 pins nothing: still undetermined."""
    args = problem(T0=1, K0=0)
    args[0].zero_()
    with pytest.raises(FactorizationError):
        solve_linear_ode(*args, method="parallel")


def test_zero_coefficients_with_initial_values_are_fine():
    """Smoothness-only rows are exact on quadratics, so pinning u, u', u'' at t = 0 determines everything."""
    args = problem(T0=1, K0=3)
    args[0].zero_()
    u = solve_linear_ode(*args, method="parallel")
    assert torch.isfinite(u).all()
    assert torch.allclose(u[:, 0, 0, :], args[2][:, 0, 0, :])
    # and the solution is the Taylor quadratic through the pinned values
    t = torch.arange(6, dtype=f64) * 0.1
    a = args[2][:, 0, 0, :]
    quad = a[:, :1] + a[:, 1:2] * t + 0.5 * a[:, 2:3] * t ** 2
    assert torch.allclose(u[..., 0, 0], quad, atol=1e-9)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_factorisation_breakdown_dense(dtype):
    with pytest.raises(FactorizationError, match=r"^the dense normal matrix is not positive definite \((Cholesky "
                                                 r"failed at column \d+ of 18|a pivot fell to <= 1.4e-14 of its "
                                                 r"diagonal)\): the least-squares problem does not determine"):
        solve_linear_ode(*_undetermined(dtype), method="dense")


def test_overflowing_inputs_fail_loudly():
    """Coefficients so large that the normal matrix overflows: an error, never a NaN result."""
    args = problem()
    args[0] = args[0] * 1e200
    with pytest.raises(FactorizationError):
        solve_linear_ode(*args, method="parallel")


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native", "dense"])
def test_float32_result_overflow_fails_loudly(method):
    """Solved in float64, the trajectory leaves float32's range: an error naming the cause, never inf."""
    args = problem(dtype=torch.float32)
    args[2] = args[2] * 1e38  # finite float32 initial values; the trajectory they start leaves float32's range
    with pytest.raises(OverflowError, match=r"^the solution exceeds the torch.float32 range: max \|u\| = 5.06e\+38 "
                                            r"> 3.4e\+38 .*pass float64 inputs"):
        solve_linear_ode(*args, method=method)
    # the same problem one decade smaller fits and is finite
    args[2] = args[2] * 0.1
    assert torch.isfinite(solve_linear_ode(*args, method=method)).all()


def _slack_absorbed(T, h, dtype):
    """K = 2, no central rows, per-step equation 2 u - t u' = 0 and nothing pinned.

    Without the slack the rows determine u (= 0). With it, u = t^2, u' = 2t, eps = h^2 makes every row exact:
    forward and backward Taylor rows of a quadratic both equal -h^2, which the shared slack absorbs. The
    bordered matrix is singular, i.e. the slack's Schur complement is 0 in exact arithmetic.
    """
    t = torch.arange(T, dtype=f64) * h
    c = torch.stack([torch.full_like(t, 2.0), -t], -1).reshape(T, 1, 1, 2)
    return [c.to(dtype), torch.zeros(T, 1, dtype=dtype), torch.zeros(0, 1, 0, dtype=dtype),
            torch.full((T - 1,), h, dtype=dtype)]


def test_slack_not_determined_fails_loudly():
    """The slack's Schur complement is 0 in exact arithmetic here and rounding picks its sign: with a `<= 0` test
    some grids raised and others returned |u| ~ 1e10..1e15 (float64 banded T=5 h=0.1: 2.4e14). Now it is
    compared with mu; measured schur/mu <= 9e-7 up to T = 301 (threshold 1e-4)."""
    silent = []
    for T in (5, 8, 12, 31, 101, 301):
        for h in (0.1, 0.01, 0.37):
            for method in ("banded", "parallel"):
                for dtype in (f64, torch.float32):
                    try:
                        u = solve_linear_ode(*_slack_absorbed(T, h, dtype), central=False, slack=1.0, method=method)
                    except FactorizationError as e:
                        assert re.search(r"^the slack variable is not determined by the rows: its Schur complement "
                                         r"mu - m\^T M\^-1 m is -?\d\.\de-\d\d of mu \(<= 1e-04\)", str(e)), str(e)
                        continue
                    silent.append((T, h, method, str(dtype), f"{u.abs().max().item():.1e}"))
    assert not silent, f"returned without an error: {silent}"


@pytest.mark.parametrize("central", [True, False])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_slack_well_posed_is_accepted(dtype, central):
    """Random problems with a slack are far from the threshold (measured schur/mu >= 0.35) and solve."""
    for seed in range(5):
        for T in (6, 50, 300):
            g = torch.Generator().manual_seed(seed)
            args = [torch.randn(3, T, 1, 1, 3, generator=g, dtype=f64), torch.randn(3, T, 1, generator=g, dtype=f64),
                    torch.randn(3, 1, 1, 2, generator=g, dtype=f64), 0.01 + 0.2 * torch.rand(3, T - 1, generator=g,
                                                                                            dtype=f64)]
            u = solve_linear_ode(*(a.to(dtype) for a in args), central=central, slack=0.5)
            assert torch.isfinite(u).all()


def test_slack_not_determined_message():
    """Where the breakdown is caught (float64, T = 12, h = 0.1 in both backends), the message names the slack."""
    for method in ("banded", "parallel"):
        with pytest.raises(FactorizationError, match=r"the slack variable is not determined by the rows"):
            solve_linear_ode(*_slack_absorbed(12, 0.1, f64), central=False, slack=1.0, method=method)


@pytest.mark.parametrize("central", [True, False])
def test_factorisation_breakdown_float32_factor_with_cg(monkeypatch, central):
    """Off the CPU float32 problems are factorised in float32 (a CG preconditioner): a singular one still fails."""
    import torchmech.mnn.solve as solve_mod

    monkeypatch.setattr(solve_mod, "_factor_dtype", lambda low, hi, device: low)
    with pytest.raises(FactorizationError, match=r"not positive definite"):
        solve_linear_ode(*_only_second_derivative(torch.float32), method="parallel", central=central)


@pytest.mark.parametrize("T", [7, 30, 200])
@pytest.mark.parametrize("method", ["dense", "banded", "parallel", "lapack", "native"])
def test_singular_systems_whose_pivots_stay_positive(method, T):
    """One time-invariant 2nd-order equation for D = 2 variables, values pinned: every quadratic with the
    equation's polynomial identity fits the Taylor rows exactly, a 1-dimensional null space. The Cholesky
    pivots of such systems stay positive (up to ~6e-8 in float64), above any pivot floor, so 20-45% of them
    used to come back as arbitrary, method-dependent solutions; the eigenvalue check catches every one."""
    if method == "dense" and T == 200:
        pytest.skip("dense is the small-problem reference")
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        c = torch.randn(1, 1, 2, 3, generator=g, dtype=f64)
        r = torch.randn(1, 1, generator=g, dtype=f64)
        init = torch.randn(1, 2, 1, generator=g, dtype=f64)
        h = torch.rand(T - 1, generator=g, dtype=f64) * 0.5 + 0.1
        for central in (False, True):
            with pytest.raises(FactorizationError, match="singular|not positive definite|broke down"):
                solve_linear_ode(c, r, init, h, central=central, method=method, num_points=T)


@pytest.mark.parametrize("bad", ["False", None, 0, 1.0])
def test_central_must_be_a_bool(bad):
    """A truthy string such as "False" switched the central rows on, None switched them off, silently."""
    c, r, i, s = problem()
    with pytest.raises(TypeError, match="central must be a bool"):
        solve_linear_ode(c, r, i, s, central=bad)
    from torchmech.mnn import MechanisticBlock

    with pytest.raises(TypeError, match="central must be a bool"):
        MechanisticBlock(central=bad)


@pytest.mark.parametrize("name", ["weight_equation", "weight_init", "weight_smooth", "slack"])
def test_one_element_weights_serve_any_batch_shape(name):
    """A (1,) or (1, 1) weight is one value for every sample: it was refused for unbatched problems (a learnable
    torch.ones(1) weight worked batched and failed unbatched). Values equal the scalar's; gradients reach it."""
    for B in [(), (2,)]:
        c, r, i, s = problem(B=B)
        ref = solve_linear_ode(c, r, i, s, **{name: 0.7})
        for shape in [(1,), (1, 1)]:
            w = torch.full(shape, 0.7, dtype=f64, requires_grad=True)
            u = solve_linear_ode(c, r, i, s, method="parallel", **{name: w})
            assert u.shape == ref.shape
            torch.testing.assert_close(u, ref, rtol=1e-10, atol=1e-10)
            (g,) = torch.autograd.grad(u.square().sum(), w)
            assert g.shape == shape and bool(torch.isfinite(g).all())
