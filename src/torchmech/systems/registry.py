"""Registry of named dynamical systems: classic benchmarks plus the 63 ODEBench systems."""

from __future__ import annotations

import difflib
import functools
import json
import re
from importlib import resources

from torchmech.systems.system import System

__all__ = ["get", "names", "register", "odebench_attribution", "true_coefficients"]

_BUILTIN: list[System] = [
    System(
        name="lorenz",
        variables=("x", "y", "z"),
        rhs=("sigma*(y - x)", "x*(rho - z) - y", "x*y - beta*z"),
        params={"sigma": 10.0, "rho": 28.0, "beta": 8.0 / 3.0},
        y0=((-8.0, 8.0, 27.0), (1.0, 1.0, 1.0)),
        t_span=(0.0, 10.0),
        description="Lorenz (1963) convection model, chaotic regime",
        source="E. N. Lorenz, J. Atmos. Sci. 20 (1963)",
    ),
    System(
        name="rossler",
        variables=("x", "y", "z"),
        rhs=("-y - z", "x + a*y", "b + z*(x - c)"),
        params={"a": 0.2, "b": 0.2, "c": 5.7},
        y0=((1.0, 1.0, 0.0), (-2.0, 0.0, 0.5)),
        t_span=(0.0, 50.0),
        description="Rossler attractor, chaotic regime",
        source="O. E. Rossler, Phys. Lett. A 57 (1976)",
    ),
    System(
        name="van_der_pol",
        variables=("x", "y"),
        rhs=("y", "mu*(1 - x^2)*y - x"),
        params={"mu": 1.0},
        y0=((2.0, 0.0), (0.5, 1.0)),
        t_span=(0.0, 20.0),
        description="Van der Pol relaxation oscillator",
        source="B. van der Pol (1926)",
    ),
    System(
        name="duffing",
        variables=("x", "v"),
        rhs=("v", "-delta*v - alpha*x - beta*x^3"),
        params={"delta": 0.2, "alpha": -1.0, "beta": 1.0},
        y0=((1.5, 0.0), (-0.5, 1.0)),
        t_span=(0.0, 20.0),
        description="unforced damped Duffing oscillator (double well for alpha < 0)",
        source="G. Duffing (1918); Strogatz, Nonlinear Dynamics and Chaos",
    ),
    System(
        name="lotka_volterra",
        variables=("x", "y"),
        rhs=("alpha*x - beta*x*y", "delta*x*y - gamma*y"),
        params={"alpha": 1.5, "beta": 1.0, "gamma": 3.0, "delta": 1.0},
        y0=((5.0, 2.0), (3.0, 3.0)),
        t_span=(0.0, 10.0),
        description="Lotka-Volterra predator (y) - prey (x) model",
        source="A. J. Lotka (1925), V. Volterra (1926)",
    ),
    System(
        name="damped_oscillator",
        variables=("x", "v"),
        rhs=("v", "-omega^2*x - 2*zeta*omega*v"),
        params={"omega": 2.0, "zeta": 0.1},
        y0=((1.0, 0.0), (0.0, 1.0)),
        t_span=(0.0, 20.0),
        description="linear damped harmonic oscillator",
        source="textbook",
    ),
    System(
        name="forced_oscillator",
        variables=("x", "v"),
        rhs=("v", "-omega^2*x - 2*zeta*omega*v + F*cos(Omega*t)"),
        params={"omega": 1.0, "zeta": 0.1, "F": 0.5, "Omega": 1.2},
        y0=((1.0, 0.0), (0.0, 0.0)),
        t_span=(0.0, 30.0),
        description="damped harmonic oscillator with harmonic forcing (non-autonomous)",
        source="textbook",
    ),
    System(
        name="pendulum",
        variables=("theta", "omega"),
        rhs=("omega", "-(g/L)*sin(theta)"),
        params={"g": 9.81, "L": 1.0},
        y0=((1.0, 0.0), (2.5, 0.0)),
        t_span=(0.0, 10.0),
        description="frictionless simple pendulum",
        source="textbook",
    ),
    System(
        name="logistic",
        variables=("x",),
        rhs=("r*x*(1 - x/K)",),
        params={"r": 1.0, "K": 10.0},
        y0=((0.5,), (15.0,)),
        t_span=(0.0, 10.0),
        description="logistic growth with rate r and carrying capacity K",
        source="P.-F. Verhulst (1838)",
    ),
    System(
        name="two_body",
        variables=("x1", "y1", "x2", "y2", "u1", "v1", "u2", "v2"),
        rhs=(
            "u1",
            "v1",
            "u2",
            "v2",
            "G*m2*(x2 - x1)/((x2 - x1)^2 + (y2 - y1)^2)^(3/2)",
            "G*m2*(y2 - y1)/((x2 - x1)^2 + (y2 - y1)^2)^(3/2)",
            "G*m1*(x1 - x2)/((x2 - x1)^2 + (y2 - y1)^2)^(3/2)",
            "G*m1*(y1 - y2)/((x2 - x1)^2 + (y2 - y1)^2)^(3/2)",
        ),
        params={"G": 1.0, "m1": 1.0, "m2": 1.0},
        y0=((-0.5, 0.0, 0.5, 0.0, 0.0, -0.6, 0.0, 0.6), (-0.5, 0.0, 0.5, 0.0, 0.0, -0.5, 0.0, 0.5)),
        t_span=(0.0, 10.0),
        description="planar Newtonian two-body problem (positions x_i, y_i and velocities u_i, v_i)",
        source="Newton's law of gravitation",
    ),
    System(
        name="sir",
        variables=("S", "I", "R"),
        rhs=("-beta*S*I", "beta*S*I - gamma*I", "gamma*I"),
        params={"beta": 0.3, "gamma": 0.1},
        y0=((0.99, 0.01, 0.0), (0.9, 0.1, 0.0)),
        t_span=(0.0, 100.0),
        description="SIR epidemic model in population fractions",
        source="W. O. Kermack and A. G. McKendrick (1927)",
    ),
]

_REGISTRY: dict[str, System] = {}


def _key(name: str) -> str:
    """The registry key of a name: case-insensitive, ``-`` and spaces read as ``_`` (register and get agree)."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register(system: System, overwrite: bool = False) -> System:
    """Add ``system`` to the registry under ``system.name`` and return it; ``get`` finds it case-insensitively,
    with ``-`` and spaces read as ``_``."""
    if not isinstance(system, System):
        raise TypeError(f"system: expected a System, got {type(system).__name__}")
    _ensure_loaded()
    key = _key(system.name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"system: the name {system.name!r} is already registered (pass overwrite=True)")
    system.symbolic_rhs  # parse the right-hand side now: an unknown name raises here (the torch translation,
    # which not every sympy function has, waits for vector_field: simulate runs through numpy)
    _REGISTRY[key] = system
    return system


@functools.lru_cache(maxsize=1)
def _odebench_json() -> dict:
    path = resources.files("torchmech.systems").joinpath("data", "odebench.json")
    return json.loads(path.read_text(encoding="utf-8"))


def odebench_attribution() -> str:
    """Source and licence line of the bundled ODEBench data."""
    return _odebench_json()["source"]


def _odebench_systems() -> list[System]:
    data = _odebench_json()
    out = []
    for e in data["equations"]:
        dim = int(e["dim"])
        components = [c.strip() for c in e["eq"].split("|")]
        if len(components) != dim:
            raise ValueError(f"odebench.json: equation {e['id']} has {len(components)} components, dim={dim}")
        consts = e["consts"][0] if e["consts"] else []
        variables = tuple(f"x_{i}" for i in range(dim))
        var_desc = {}
        for part in re.split(r",\s*(?=x_\d+\s*:)", e.get("var_description", "")):
            if ":" in part:
                k, v = part.split(":", 1)
                var_desc[k.strip()] = v.strip()
        out.append(
            System(
                name=f"odebench_{int(e['id']):02d}",
                variables=variables,
                rhs=tuple(components),
                params={f"c_{i}": float(c) for i, c in enumerate(consts)},
                y0=tuple(tuple(float(v) for v in row) for row in e["init"]),
                t_span=(0.0, 10.0),
                description=e.get("eq_description", ""),
                source=f"ODEBench #{e['id']} ({e.get('source', '')}); {data['source']}",
                variable_descriptions=var_desc,
            )
        )
    return out


def _ensure_loaded() -> None:
    if _REGISTRY:
        return
    for s in _BUILTIN + _odebench_systems():
        _REGISTRY[_key(s.name)] = s


def names(prefix: str | None = None) -> list[str]:
    """Registered system names, optionally only those starting with ``prefix`` (e.g. ``"odebench"``)."""
    _ensure_loaded()
    keys = list(_REGISTRY)
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix: expected None or a str, got {type(prefix).__name__}")
    if prefix is not None:
        keys = [k for k in keys if k.startswith(_key(prefix))]
    return keys


def get(name: str | System) -> System:
    """The registered system called ``name`` (case-insensitive, ``-`` and spaces read as ``_``).

    Raises:
        TypeError: when ``name`` is not a string.
        ValueError: when no system has that name (the message suggests close names).
    """
    if isinstance(name, System):
        return name
    if not isinstance(name, str):
        raise TypeError(f"name: expected a system name (str), got {type(name).__name__}")
    _ensure_loaded()
    key = _key(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"name: unknown system {name!r}{hint} (torchmech.systems.names() lists the {len(_REGISTRY)} known systems)"
        )
    return _REGISTRY[key]


def true_coefficients(system, library, params=None, dtype=None, device=None):
    """The ground-truth (D, F) coefficient matrix of a registered system in a feature library.

    Shorthand for ``get(system).true_coefficients(library, params, dtype, device)``: row d holds
    the coefficients of ``dx_d/dt`` on the library's features (written in the system's variable
    names), the layout of ``SINDy.coefficients_``. ``dtype`` defaults to float64.

    Raises:
        ValueError: when the system's right-hand side is not a linear combination of the features.
    """
    import torch

    return get(system).true_coefficients(library, params=params, dtype=dtype or torch.float64, device=device)
