"""Registry of known systems: simulation, ODEBench loading, true coefficients and input checks."""

import numpy as np
import pytest
import sympy
import torch

from torchmech import systems
from torchmech.discovery.library import FourierLibrary, PolynomialLibrary


def test_registry_has_classics_and_all_odebench():
    names = systems.names()
    for n in ["lorenz", "rossler", "van_der_pol", "duffing", "lotka_volterra", "damped_oscillator",
              "forced_oscillator", "pendulum", "logistic", "two_body", "sir"]:
        assert n in names
    assert len(systems.names("odebench")) == 63
    assert "ODEFormer" in systems.odebench_attribution() and "MIT" in systems.odebench_attribution()
    assert "ODEBench #12" in systems.get("odebench_12").source
    assert systems.get("Van der Pol") is systems.get("van_der_pol")


@pytest.mark.parametrize("name", systems.names())
def test_every_system_simulates_finite_and_torch_field_matches(name):
    s = systems.get(name)
    t = torch.linspace(s.t_span[0], s.t_span[1], 64, dtype=torch.float64)
    tr = systems.simulate(s, t, noise=0.01, seed=0)
    B = len(s.y0)
    assert tr.x.shape == (B, 64, s.dim) and tr.x_clean.shape == (B, 64, s.dim)
    assert torch.isfinite(tr.x).all()
    assert torch.allclose(tr.x_clean[:, 0], s.initial_conditions())
    # the torch vector field (used by models) and the numpy one (used to integrate) agree
    y = tr.x_clean[:, 5]
    f_torch = s.vector_field(t[5], y)
    f_np = torch.from_numpy(s.numpy_vector_field(float(t[5]), y.numpy()))
    assert torch.allclose(f_torch, f_np, rtol=1e-10, atol=1e-10)
    assert len(s.equations()) == s.dim


def test_simulate_matches_closed_form_and_noise_level():
    s = systems.get("damped_oscillator")  # omega 2, zeta 0.1, from (1, 0)
    t = torch.linspace(0, 5, 201, dtype=torch.float64)
    tr = systems.simulate(s, t, y0=[1.0, 0.0])
    wd = 2.0 * np.sqrt(1 - 0.01)
    tn = t.numpy()
    exact = np.exp(-0.2 * tn) * (np.cos(wd * tn) + 0.2 / wd * np.sin(wd * tn))
    assert tr.x.shape == (201, 2)
    assert np.allclose(tr.x_clean[:, 0].numpy(), exact, atol=1e-8)
    noisy = systems.simulate(s, t, y0=[1.0, 0.0], noise=0.1, seed=3)
    again = systems.simulate(s, t, y0=[1.0, 0.0], noise=0.1, seed=3)
    assert torch.equal(noisy.x, again.x)
    ratio = (noisy.x - noisy.x_clean).std(0) / noisy.x_clean.std(0)
    assert torch.all((ratio > 0.08) & (ratio < 0.12)), ratio


def test_batched_initial_conditions_and_per_trajectory_params():
    s = systems.get("logistic")
    t = torch.linspace(0, 4, 50)
    tr = systems.simulate(s, t, y0=torch.tensor([[1.0], [1.0]]), params={"r": torch.tensor([1.0, 2.0])})
    assert tr.x.dtype == torch.float32 and tr.x.shape == (2, 50, 1)
    exact = lambda r: 10 / (1 + 9 * torch.exp(-r * t))  # noqa: E731
    assert torch.allclose(tr.x[0, :, 0], exact(1.0), atol=1e-5)
    assert torch.allclose(tr.x[1, :, 0], exact(2.0), atol=1e-5)


def test_true_coefficients_lorenz_poly2():
    lib = PolynomialLibrary(degree=2)
    names = lib.feature_names(["x", "y", "z"])
    C = systems.get("lorenz").true_coefficients(lib)
    assert C.shape == (3, 10) and C.dtype == torch.float64
    expected = {(0, "x"): -10, (0, "y"): 10, (1, "x"): 28, (1, "y"): -1, (1, "x*z"): -1,
                (2, "z"): -8 / 3, (2, "x*y"): 1}
    E = torch.zeros(3, 10, dtype=torch.float64)
    for (d, n), v in expected.items():
        E[d, names.index(n)] = v
    assert torch.allclose(C, E, atol=1e-14)
    # the module-level shorthand, by name, with a parameter override
    C2 = systems.true_coefficients("lorenz", lib, params={"rho": 10.0}, dtype=torch.float32)
    assert C2.dtype == torch.float32 and C2[1, names.index("x")] == 10.0


def test_true_coefficients_other_libraries_and_errors():
    pend = systems.get("pendulum")
    lib = PolynomialLibrary(degree=1) + FourierLibrary(1)
    C = pend.true_coefficients(lib, dtype=torch.float32)
    names = lib.feature_names(["theta", "omega"])
    assert C.dtype == torch.float32 and C[1, names.index("sin(theta)")] == pytest.approx(-9.81)
    assert C[0, names.index("omega")] == 1 and int((C != 0).sum()) == 2
    with pytest.raises(ValueError, match="not expressible"):
        pend.true_coefficients(PolynomialLibrary(degree=3))
    with pytest.raises(TypeError, match="library"):
        pend.true_coefficients(3.0)


def test_symbolic_equations():
    eqs = systems.get("lotka_volterra").equations()
    x, y = sympy.symbols("x y")
    assert sympy.simplify(eqs[0] - (1.5 * x - x * y)) == 0
    assert not systems.get("forced_oscillator").autonomous and systems.get("lorenz").autonomous


def test_bad_inputs():
    t = torch.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="unknown system 'lorenzz'.*lorenz"):
        systems.get("lorenzz")
    with pytest.raises(TypeError, match="name"):
        systems.get(3)
    with pytest.raises(ValueError, match=r"y0: expected shape \(B, 3\)"):
        systems.simulate("lorenz", t, y0=[1.0, 2.0])
    with pytest.raises(ValueError, match="y0: expected finite"):
        systems.simulate("lorenz", t, y0=[1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="noise"):
        systems.simulate("lorenz", t, noise=-0.1)
    with pytest.raises(TypeError, match="seed: expected None or an int"):
        systems.simulate("lorenz", t, noise=0.1, seed="a")
    with pytest.raises(ValueError, match="strictly increasing"):
        systems.simulate("lorenz", torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="1-D time grid"):
        systems.simulate("lorenz", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="unknown parameter"):
        systems.simulate("lorenz", t, params={"sgima": 1.0})
    # non-finite parameters used to hang scipy's DOP853 (its step control loops on a NaN error estimate)
    with pytest.raises(ValueError, match=r"params\['sigma'\]: expected a finite number"):
        systems.simulate("lorenz", t, params={"sigma": float("nan")})
    with pytest.raises(ValueError, match=r"params\['sigma'\]: expected finite values, got \[10.0, inf\]"):
        systems.simulate("lorenz", t, y0=[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
                         params={"sigma": torch.tensor([10.0, float("inf")])})
    with pytest.raises(RuntimeError, match="integration failed at t=0: the vector field returned NaN or infinite"):
        systems.simulate("lorenz", t, y0=[1e200, 1e200, 1e200])
    with pytest.raises(TypeError, match="dtype: expected None, torch.float32 or torch.float64, got 'float32'"):
        systems.simulate("lorenz", t, dtype="float32")
    with pytest.raises(TypeError, match="prefix: expected None or a str"):
        systems.names(3)
    with pytest.raises(TypeError, match="library"):
        systems.get("lorenz").true_coefficients("x")
    sim = systems.simulate("lorenz", t, noise=np.float32(0.1), seed=0,
                           params={"sigma": np.array([10.0, 11.0])}, y0=[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert sim.x.shape == (2, 10, 3)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 3\)"):
        systems.get("lorenz").vector_field(0.0, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="already registered"):
        systems.register(systems.get("lorenz"))


def test_registered_names_are_found_the_way_get_spells_them():
    """register stored name.lower() while get also reads '-' and spaces as '_': a registered 'my-decay' was
    listed but 'unknown'."""
    s = systems.System(name="My-Decay Model", variables=("x",), rhs=("-k*x",), params={"k": 0.5},
                       y0=((1.0,),), t_span=(0.0, 1.0))
    try:
        systems.register(s)
        for spelling in ("My-Decay Model", "my_decay_model", "my-decay-model"):
            assert systems.get(spelling) is s
    finally:
        systems.registry._REGISTRY.pop("my_decay_model", None)


def test_register_checks_the_right_hand_side_and_translates_floor():
    bad = systems.System(name="bad_rhs_test", variables=("x",), rhs=("-q*x",), params={}, y0=((1.0,),),
                         t_span=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"unknown names \['q'\]"):
        systems.register(bad)
    assert "bad_rhs_test" not in systems.names()
    fl = systems.System(name="floor_rhs_test", variables=("x",), rhs=("floor(x) - x",), params={}, y0=((1.5,),),
                        t_span=(0.0, 1.0))
    torch.testing.assert_close(fl.vector_field(0.0, torch.tensor([[1.5], [-0.5]], dtype=torch.float64)),
                               torch.tensor([[-0.5], [-0.5]], dtype=torch.float64))


def test_register_accepts_functions_only_numpy_simulates():
    """register translated the right-hand side to torch: a Max (simulated through numpy) could not be registered."""
    s = systems.System(name="max_rhs_test", variables=("x",), rhs=("Max(x, 0) - x",), params={}, y0=((1.0,),),
                       t_span=(0.0, 1.0))
    try:
        systems.register(s)
        assert systems.get("max_rhs_test") is s
    finally:
        systems.registry._REGISTRY.pop("max_rhs_test", None)
