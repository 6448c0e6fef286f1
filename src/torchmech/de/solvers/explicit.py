"""Named explicit Runge-Kutta solvers: Euler, Midpoint, Heun, Ralston, RK4, Bosh3, Dopri5, Tsit5, Dopri8."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from torchmech.de.solvers.rk import ButcherTableau, ExplicitRK, _combine

__all__ = [
    "Euler", "Midpoint", "Heun", "Ralston", "RK4", "Bosh3", "Dopri5", "Tsit5", "Dopri8",
    "EULER", "MIDPOINT", "HEUN", "RALSTON", "RK4_TABLEAU", "BOSH3", "DOPRI5", "TSIT5", "DOPRI8",
]


def _poly_to_dense(polys: Sequence[np.ndarray]) -> list[list[float]]:
    """Turn per-stage polynomials b_i(theta) (numpy poly1d, b_i(0) = 0) into rows of theta^1..theta^deg."""
    deg = max(p.order for p in polys)
    rows = []
    for p in polys:
        coef = p.coeffs[::-1]  # ascending powers
        full = np.zeros(deg + 1)
        full[: len(coef)] = coef
        if abs(full[0]) > 1e-14:
            raise ValueError("dense-output polynomial must vanish at theta = 0")
        rows.append([float(x) for x in full[1:]])
    return rows


# Euler: first order, no error estimate.
EULER = ButcherTableau(c=[0.0], a=[], b=[1.0], order=1)

# Explicit midpoint, embedded Euler.
MIDPOINT = ButcherTableau(c=[0.0, 0.5], a=[[0.5]], b=[0.0, 1.0], order=2,
                          b_error=[-1.0, 1.0], embedded_order=1)

# Heun (explicit trapezoid), embedded Euler.
HEUN = ButcherTableau(c=[0.0, 1.0], a=[[1.0]], b=[0.5, 0.5], order=2,
                      b_error=[-0.5, 0.5], embedded_order=1)

# Ralston's second-order method (minimum error bound), embedded Euler.
RALSTON = ButcherTableau(c=[0.0, 2 / 3], a=[[2 / 3]], b=[0.25, 0.75], order=2,
                         b_error=[-0.75, 0.75], embedded_order=1)

# Classical fourth-order Runge-Kutta.
RK4_TABLEAU = ButcherTableau(c=[0.0, 0.5, 0.5, 1.0], a=[[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
                             b=[1 / 6, 1 / 3, 1 / 3, 1 / 6], order=4)

# Bogacki-Shampine 3(2), FSAL.
_BS_B = [2 / 9, 1 / 3, 4 / 9, 0.0]
_BS_BHAT = [7 / 24, 1 / 4, 1 / 3, 1 / 8]
BOSH3 = ButcherTableau(
    c=[0.0, 0.5, 0.75, 1.0], a=[[0.5], [0.0, 0.75], [2 / 9, 1 / 3, 4 / 9]], b=_BS_B, order=3,
    b_error=[x - y for x, y in zip(_BS_B, _BS_BHAT)], embedded_order=2, fsal=True,
)

# Dormand-Prince 5(4), FSAL, with Shampine's fourth-order continuous extension
# (Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.6).
_DP_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_DP_BHAT = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
_DP_D = [-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799, -10690763975 / 1880347072,
         701980252875 / 199316789632, -1453857185 / 822651844, 69997945 / 29380423]


def _dopri5_dense() -> list[list[float]]:
    # Hairer's form y = r1 + th (r2 + (1-th) (r3 + th (r4 + (1-th) r5))) with
    # r2 = sum b k, r3 = k1 - r2, r4 = r2 - k7 - r3, r5 = sum d k, expanded in powers of th.
    b = np.array(_DP_B)
    d = np.array(_DP_D)
    e0 = np.eye(7)[0]
    e6 = np.eye(7)[6]
    q1 = e0
    q2 = 3 * b - 2 * e0 - e6 + d
    q3 = -2 * b + e0 + e6 - 2 * d
    q4 = d
    return [[float(q1[i]), float(q2[i]), float(q3[i]), float(q4[i])] for i in range(7)]


DOPRI5 = ButcherTableau(
    c=[0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    a=[
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        _DP_B[:6],
    ],
    b=_DP_B, order=5, b_error=[x - y for x, y in zip(_DP_B, _DP_BHAT)], embedded_order=4,
    fsal=True, dense=_dopri5_dense(),
)

# Tsitouras 5(4) (Tsitouras 2011, Comput. Math. Appl. 62:770), FSAL, with the paper's
# fourth-order continuous extension.
_TS_B = [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
         -3.290069515436081, 2.324710524099774, 0.0]
_TS_BERR = [-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995,
            -0.1447110071732629, 0.5823571654525552, -0.45808210592918697, 1 / 66]


def _tsit5_dense() -> list[list[float]]:
    P = np.poly1d
    th = P([1.0, 0.0])
    polys = [
        -1.0530884977290216 * th * P([1.0, -1.3299890189751412])
        * P([1.0, -1.4364028541716351, 0.7139816917074209]),
        0.1017 * th * th * P([1.0, -2.1966568338249754, 1.2949852507374631]),
        2.490627285651252793 * th * th * P([1.0, -2.38535645472061657, 1.57803468208092486]),
        -16.54810288924490272 * P([1.0, -1.21712927295533244]) * P([1.0, -0.61620406037800089]) * th * th,
        47.37952196281928122 * P([1.0, -1.203071208372362603]) * P([1.0, -0.658047292653547382]) * th * th,
        -34.87065786149660974 * P([1.0, -1.2]) * P([1.0, -0.666666666666666667]) * th * th,
        2.5 * P([1.0, -1.0]) * P([1.0, -0.6]) * th * th,
    ]
    return _poly_to_dense(polys)


TSIT5 = ButcherTableau(
    c=[0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0],
    a=[
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.897153057105493, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383],
        _TS_B[:6],
    ],
    b=_TS_B, order=5, b_error=_TS_BERR, embedded_order=4, fsal=True, dense=_tsit5_dense(),
)

# Dormand-Prince 8(5,3) ("DOP853", Hairer, Norsett & Wanner), 12 stages plus the FSAL stage.
_D8_C = [0.0, 0.05260015195876773, 0.0789002279381516, 0.1183503419072274, 0.2816496580927726,
         0.3333333333333333, 0.25, 0.3076923076923077, 0.6512820512820513, 0.6,
         0.8571428571428571, 1.0, 1.0]
_D8_A = [
    [0.05260015195876773],
    [0.0197250569845379, 0.0591751709536137],
    [0.02958758547680685, 0.0, 0.08876275643042054],
    [0.2413651341592667, 0.0, -0.8845494793282861, 0.924834003261792],
    [0.037037037037037035, 0.0, 0.0, 0.17082860872947386, 0.12546768756682242],
    [0.037109375, 0.0, 0.0, 0.17025221101954405, 0.06021653898045596, -0.017578125],
    [0.03709200011850479, 0.0, 0.0, 0.17038392571223998, 0.10726203044637328,
     -0.015319437748624402, 0.008273789163814023],
    [0.6241109587160757, 0.0, 0.0, -3.3608926294469414, -0.868219346841726, 27.59209969944671,
     20.154067550477894, -43.48988418106996],
    [0.47766253643826434, 0.0, 0.0, -2.4881146199716677, -0.590290826836843, 21.230051448181193,
     15.279233632882423, -33.28821096898486, -0.020331201708508627],
    [-0.9371424300859873, 0.0, 0.0, 5.186372428844064, 1.0914373489967295, -8.149787010746927,
     -18.52006565999696, 22.739487099350505, 2.4936055526796523, -3.0467644718982196],
    [2.273310147516538, 0.0, 0.0, -10.53449546673725, -2.0008720582248625, -17.9589318631188,
     27.94888452941996, -2.8589982771350235, -8.87285693353063, 12.360567175794303,
     0.6433927460157636],
    [0.054293734116568765, 0.0, 0.0, 0.0, 0.0, 4.450312892752409, 1.8915178993145003,
     -5.801203960010585, 0.3111643669578199, -0.1521609496625161, 0.20136540080403034,
     0.04471061572777259],
]
_D8_B = _D8_A[-1] + [0.0]
_D8_E3 = [-0.18980075407240762, 0.0, 0.0, 0.0, 0.0, 4.450312892752409, 1.8915178993145003,
          -5.801203960010585, -0.4226823213237919, -0.1521609496625161, 0.20136540080403034,
          0.02265179219836082, 0.0]
_D8_E5 = [0.01312004499419488, 0.0, 0.0, 0.0, 0.0, -1.2251564463762044, -0.4957589496572502,
          1.6643771824549864, -0.35032884874997366, 0.3341791187130175, 0.08192320648511571,
          -0.022355307863886294, 0.0]
# Extra stages and coefficients of DOP853's seventh-order continuous extension.
_D8_EXTRA = [
    (0.1, [0.056167502283047954, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25350021021662483, -0.2462390374708025,
           -0.12419142326381637, 0.15329179827876568, 0.00820105229563469, 0.007567897660545699,
           -0.008298]),
    (0.2, [0.03183464816350214, 0.0, 0.0, 0.0, 0.0, 0.028300909672366776, 0.053541988307438566,
           -0.05492374857139099, 0.0, 0.0, -0.00010834732869724932, 0.0003825710908356584,
           -0.00034046500868740456, 0.1413124436746325]),
    (0.7777777777777778, [-0.42889630158379194, 0.0, 0.0, 0.0, 0.0, -4.697621415361164, 7.683421196062599,
                          4.06898981839711, 0.3567271874552811, 0.0, 0.0, 0.0, -0.0013990241651590145,
                          2.9475147891527724, -9.15095847217987]),
]
_D8_D = [
    [-8.428938276109013, 0.0, 0.0, 0.0, 0.0, 0.5667149535193777, -3.0689499459498917, 2.38466765651207,
     2.117034582445028, -0.871391583777973, 2.2404374302607883, 0.6315787787694688, -0.08899033645133331,
     18.148505520854727, -9.194632392478356, -4.436036387594894],
    [10.427508642579134, 0.0, 0.0, 0.0, 0.0, 242.28349177525817, 165.20045171727028, -374.5467547226902,
     -22.113666853125306, 7.733432668472264, -30.674084731089398, -9.332130526430229, 15.697238121770845,
     -31.139403219565178, -9.35292435884448, 35.81684148639408],
    [19.985053242002433, 0.0, 0.0, 0.0, 0.0, -387.0373087493518, -189.17813819516758, 527.8081592054236,
     -11.57390253995963, 6.8812326946963, -1.0006050966910838, 0.7777137798053443, -2.778205752353508,
     -60.19669523126412, 84.32040550667716, 11.99229113618279],
    [-25.69393346270375, 0.0, 0.0, 0.0, 0.0, -154.18974869023643, -231.5293791760455, 357.6391179106141,
     93.40532418362432, -37.45832313645163, 104.0996495089623, 29.8402934266605, -43.53345659001114,
     96.32455395918828, -39.17726167561544, -149.72683625798564],
]


def _dopri8_dense() -> list[list[float]]:
    # y = y0 + x (F0 + (1-x) (F1 + x (F2 + (1-x) (F3 + x (F4 + (1-x) (F5 + x F6)))))) with
    # F0 = sum b k, F1 = k1 - F0, F2 = 2 F0 - k1 - k13, F3.. = D k (16 stages), expanded in x.
    n = 16
    b = np.zeros(n)
    b[:13] = _D8_B
    e0, e12 = np.eye(n)[0], np.eye(n)[12]
    F = [b, e0 - b, 2 * b - e0 - e12] + [np.array(r) for r in _D8_D]
    x = np.poly1d([1.0, 0.0])
    omx = np.poly1d([-1.0, 1.0])
    weights = [x, x * omx, x ** 2 * omx, x ** 2 * omx ** 2, x ** 3 * omx ** 2, x ** 3 * omx ** 3,
               x ** 4 * omx ** 3]
    polys = [sum((float(Fj[i]) * w for Fj, w in zip(F, weights)), np.poly1d([0.0])) for i in range(n)]
    return _poly_to_dense(polys)


DOPRI8 = ButcherTableau(c=_D8_C, a=_D8_A, b=_D8_B, order=8, b_error=_D8_E5, embedded_order=7, fsal=True,
                        dense=_dopri8_dense(), dense_stages=_D8_EXTRA)


class Euler(ExplicitRK):
    """Forward Euler, order 1, fixed steps only (no error estimate)."""

    def __init__(self):
        super().__init__(EULER)


class Midpoint(ExplicitRK):
    """Explicit midpoint, order 2, embedded Euler error estimate."""

    def __init__(self):
        super().__init__(MIDPOINT)


class Heun(ExplicitRK):
    """Heun's method (explicit trapezoid), order 2, embedded Euler error estimate."""

    def __init__(self):
        super().__init__(HEUN)


class Ralston(ExplicitRK):
    """Ralston's second-order method, embedded Euler error estimate."""

    def __init__(self):
        super().__init__(RALSTON)


class RK4(ExplicitRK):
    """Classical fourth-order Runge-Kutta, fixed steps only."""

    def __init__(self):
        super().__init__(RK4_TABLEAU)


class Bosh3(ExplicitRK):
    """Bogacki-Shampine 3(2), FSAL, cubic Hermite dense output."""

    def __init__(self):
        super().__init__(BOSH3)


class Dopri5(ExplicitRK):
    """Dormand-Prince 5(4), FSAL, fourth-order dense output."""

    def __init__(self):
        super().__init__(DOPRI5)


class Tsit5(ExplicitRK):
    """Tsitouras 5(4), FSAL, fourth-order dense output."""

    def __init__(self):
        super().__init__(TSIT5)


class Dopri8(ExplicitRK):
    """Dormand-Prince 8(5,3) (DOP853), FSAL, seventh-order dense output (3 extra stages when needed).

    The error estimate combines the fifth- and third-order embedded estimates componentwise,
    ``e5^2 / sqrt(e5^2 + 0.01 e3^2)``, which behaves like ``O(h^8)``.
    """

    def __init__(self):
        super().__init__(DOPRI8)
        self.error_order = 8

    def error_estimate(self, ks: Sequence[Tensor]) -> Tensor:
        e5 = _combine(None, _D8_E5, ks)
        e3 = _combine(None, _D8_E3, ks)
        den = torch.sqrt(e5 * e5 + 0.01 * e3 * e3)
        pos = den > 0
        return torch.where(pos, e5 * e5 / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(den))
