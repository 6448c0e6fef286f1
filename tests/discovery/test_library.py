"""Feature libraries: names, values, sympy forms, combination and batching."""

import pytest
import sympy
import torch

from torchmech.discovery.library import (
    ConcatLibrary,
    CustomLibrary,
    FourierLibrary,
    PolynomialLibrary,
    TensorLibrary,
)


def test_polynomial_names_and_values():
    lib = PolynomialLibrary(degree=2)
    assert lib.feature_names(["x", "y"]) == ["1", "x", "y", "x^2", "x*y", "y^2"]
    x = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    assert lib(x).tolist() == [[1, 2, 3, 4, 6, 9]]
    assert lib.n_features(3) == 10
    assert PolynomialLibrary(3, include_interaction=False, include_bias=False).feature_names(n_variables=2) == [
        "x", "y", "x^2", "y^2", "x^3", "y^3"]
    assert PolynomialLibrary(2).feature_names(n_variables=4)[:3] == ["1", "x0", "x1"]


def test_every_library_matches_its_sympy_form_and_batches():
    custom = CustomLibrary([torch.exp, lambda a, b: a / b], ["exp({})", "{0}/{1}"])
    libs = [PolynomialLibrary(3), FourierLibrary(2), custom, PolynomialLibrary(1) + FourierLibrary(1),
            PolynomialLibrary(1) * FourierLibrary(1)]
    x = torch.rand(4, 7, 3, dtype=torch.float64) + 0.5  # a batch of 4 trajectories of 7 samples
    for lib in libs:
        theta = lib(x)
        F = lib.n_features(3)
        assert theta.shape == (4, 7, F) and theta.dtype == torch.float64
        assert len(lib.feature_names(["a", "b", "c"])) == F
        exprs = lib.sympy_features(["a", "b", "c"])
        syms = sympy.symbols("a b c")
        f = sympy.lambdify(syms, exprs, "math")
        for i in (0, 3):
            got = torch.tensor(f(*x[i, 2].tolist()), dtype=torch.float64)
            assert torch.allclose(theta[i, 2], got, rtol=1e-12), lib
    assert isinstance(libs[3], ConcatLibrary) and isinstance(libs[4], TensorLibrary)
    assert libs[4].feature_names(["x"]) == ["sin(x)", "cos(x)", "x*sin(x)", "x*cos(x)"]
    assert custom.feature_names(["x", "y"]) == ["exp(x)", "exp(y)", "x/y"]


def test_float32_stays_float32():
    x = torch.randn(10, 2)
    assert (PolynomialLibrary(2) + FourierLibrary(1))(x).dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="degree"):
        PolynomialLibrary(0)
    with pytest.raises(ValueError, match="n_frequencies"):
        FourierLibrary(0)
    with pytest.raises(ValueError, match="names: expected one name per function"):
        CustomLibrary([torch.sin], [])
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        PolynomialLibrary(2).transform([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"x: expected shape \(..., D\) with D >= 1 variables, got \(5, 0\)"):
        PolynomialLibrary(2).transform(torch.zeros(5, 0))
    with pytest.raises(TypeError, match="floating-point"):
        PolynomialLibrary(2).transform(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="variable_names: expected 3 names"):
        PolynomialLibrary(2).feature_names(["x"], n_variables=3)
