"""BaseDiscovery contract: a subclass that only implements fit gets the whole estimator API."""

import pytest
import sympy
import torch

from torchmech import systems
from torchmech.discovery import BaseDiscovery, PolynomialLibrary, as_trajectories, metrics


class Oracle(BaseDiscovery):
    """Fits nothing: reads the true coefficients of a registry system (a stand-in for a real method)."""

    def __init__(self, system, library=None):
        self.system = system
        self.library = PolynomialLibrary(2) if library is None else library

    def fit(self, x, t, u=None, variable_names=None):
        xs, ts, us = as_trajectories(x, t, u)
        s = systems.get(self.system)
        names, controls = self._names(variable_names or list(s.variables), xs[0].shape[-1], None, 0)
        C = s.true_coefficients(self.library, dtype=xs[0].dtype, device=xs[0].device)
        self._set_fit(C, names, controls)
        return self


def test_subclass_implementing_only_fit_gets_the_api():
    s = systems.get("lorenz")
    t = torch.linspace(0, 2, 401, dtype=torch.float64)
    tr = systems.simulate(s, t)
    model = Oracle("lorenz").fit(tr.x, t)
    assert model.coefficients_.shape == (3, 10) and model.complexity == 7
    assert model.equations(1)[0] == "x' = -10.0 x + 10.0 y"
    assert torch.allclose(model.predict(tr.x_clean), s.vector_field(t, tr.x_clean))
    sim = model.simulate(tr.x_clean[:, 0], t)
    assert float(metrics.trajectory_r2(sim, tr.x_clean).min()) > 0.9999
    x, y, z = sympy.symbols("x y z")
    assert sympy.simplify(model.to_sympy()[1] - (28 * x - y - x * z)) == 0
    assert model.score(tr.x, t) > 0.99
    assert model.score(tr.x, t, x_dot=s.vector_field(t, tr.x_clean)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"coefficients: expected shape \(D, F\) = \(3, 10\)"):
        model._set_fit(torch.zeros(3, 4), ["x", "y", "z"])
    with pytest.raises(RuntimeError, match="Oracle: call fit"):
        Oracle("lorenz").predict(tr.x)
