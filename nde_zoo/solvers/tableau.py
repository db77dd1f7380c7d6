"""Butcher tableaux of explicit Runge-Kutta methods, each checked on construction.

A tableau is data, not code: one generic step (:func:`nde_zoo.solvers.rk.rk_step`)
serves every method. Validation follows diffrax's ``ButcherTableau.__post_init__``:
row sums equal ``c``, ``sum(b) == 1``, ``sum(b_error) == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

__all__ = ["ButcherTableau", "TABLEAUX", "get_tableau", "solver_names"]

_TOL = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Args:
        name: registry name (``"rk4"``).
        c: stage times, length ``s`` (``c[0] == 0``).
        a: strictly lower-triangular coefficients: ``a[i]`` has ``i`` entries (row 0 empty).
        b: solution weights, length ``s``.
        order: the order of the solution (asserted in the test suite).
        b_error: weights of the embedded error estimate ``h * sum_i b_error[i] k_i``
            (``b - b_hat``), length ``s``, or ``None`` for a fixed-step method.
        fsal: the last stage is evaluated at the new state, so the next step reuses it.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    b_error: tuple[float, ...] | None = None
    fsal: bool = False

    def __post_init__(self) -> None:
        s = len(self.c)
        problems = []
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            problems.append(f"a must be strictly lower triangular with {s} rows (row i has i entries)")
        else:
            for i, row in enumerate(self.a):
                if abs(sum(row) - self.c[i]) > _TOL:
                    problems.append(f"row {i} of a sums to {sum(row)!r}, but c[{i}] = {self.c[i]!r}")
        if len(self.b) != s:
            problems.append(f"b has {len(self.b)} entries for {s} stages")
        elif abs(sum(self.b) - 1.0) > _TOL:
            problems.append(f"sum(b) = {sum(self.b)!r}, must be 1")
        if self.b_error is not None:
            if len(self.b_error) != s:
                problems.append(f"b_error has {len(self.b_error)} entries for {s} stages")
            elif abs(sum(self.b_error)) > _TOL:
                problems.append(f"sum(b_error) = {sum(self.b_error)!r}, must be 0")
        if self.fsal and (
            self.b[-1] != 0.0 or len(self.a) < 2 or tuple(self.a[-1]) != tuple(self.b[:-1])
        ):
            problems.append("fsal needs the last row of a to equal b and b[-1] == 0")
        if self.order < 1:
            problems.append(f"order must be >= 1, got {self.order}")
        if problems:
            raise ValueError(f"invalid Butcher tableau {self.name!r}: " + "; ".join(problems))

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the method carries an embedded error estimate."""
        return self.b_error is not None


def _f(*xs: str | int | float) -> tuple[float, ...]:
    return tuple(float(Fraction(x)) if isinstance(x, str) else float(x) for x in xs)


EULER = ButcherTableau("euler", c=_f(0), a=((),), b=_f(1), order=1)
MIDPOINT = ButcherTableau("midpoint", c=_f(0, "1/2"), a=((), _f("1/2")), b=_f(0, 1), order=2)
# Heun's method with Euler embedded: torchdiffeq's "adaptive_heun".
HEUN = ButcherTableau(
    "heun", c=_f(0, 1), a=((), _f(1)), b=_f("1/2", "1/2"), order=2, b_error=_f("-1/2", "1/2")
)
RALSTON = ButcherTableau("ralston", c=_f(0, "2/3"), a=((), _f("2/3")), b=_f("1/4", "3/4"), order=2)
RALSTON3 = ButcherTableau(
    "ralston3",
    c=_f(0, "1/2", "3/4"),
    a=((), _f("1/2"), _f(0, "3/4")),
    b=_f("2/9", "1/3", "4/9"),
    order=3,
)
RK4 = ButcherTableau(
    "rk4",
    c=_f(0, "1/2", "1/2", 1),
    a=((), _f("1/2"), _f(0, "1/2"), _f(0, 0, 1)),
    b=_f("1/6", "1/3", "1/3", "1/6"),
    order=4,
)
# Kutta's 3/8 rule: torchdiffeq's "rk4".
RK38 = ButcherTableau(
    "rk38",
    c=_f(0, "1/3", "2/3", 1),
    a=((), _f("1/3"), _f("-1/3", 1), _f(1, -1, 1)),
    b=_f("1/8", "3/8", "3/8", "1/8"),
    order=4,
)
BOSH3 = ButcherTableau(
    "bosh3",
    c=_f(0, "1/2", "3/4", 1),
    a=((), _f("1/2"), _f(0, "3/4"), _f("2/9", "1/3", "4/9")),
    b=_f("2/9", "1/3", "4/9", 0),
    b_error=_f(Fraction(2, 9) - Fraction(7, 24),
               Fraction(1, 3) - Fraction(1, 4), Fraction(4, 9) - Fraction(1, 3), Fraction(-1, 8)),
    order=3,
    fsal=True,
)
DOPRI5 = ButcherTableau(
    "dopri5",
    c=_f(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    a=(
        (),
        _f("1/5"),
        _f("3/40", "9/40"),
        _f("44/45", "-56/15", "32/9"),
        _f("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        _f("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"),
    ),
    b=_f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0),
    b_error=_f(
        Fraction(35, 384) - Fraction(1951, 21600),
        0,
        Fraction(500, 1113) - Fraction(22642, 50085),
        Fraction(125, 192) - Fraction(451, 720),
        Fraction(-2187, 6784) + Fraction(12231, 42400),
        Fraction(11, 84) - Fraction(649, 6300),
        Fraction(-1, 60),
    ),
    order=5,
    fsal=True,
)
# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption". Coefficients as published (double precision suffices).
_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
)
_TSIT5_B_HAT = (
    0.09468075576583945,
    0.009183565540343254,
    0.4877705284247616,
    1.234297566930479,
    -2.7077123499835256,
    1.866628418170587,
    1 / 66,
)
TSIT5 = ButcherTableau(
    "tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383),
        _TSIT5_B,
    ),
    b=(*_TSIT5_B, 0.0),
    b_error=tuple(b - bh for b, bh in zip((*_TSIT5_B, 0.0), _TSIT5_B_HAT)),
    order=5,
    fsal=True,
)

TABLEAUX: dict[str, ButcherTableau] = {
    t.name: t
    for t in (EULER, MIDPOINT, HEUN, RALSTON, RALSTON3, RK4, RK38, BOSH3, DOPRI5, TSIT5)
}


def solver_names() -> list[str]:
    return sorted(TABLEAUX)


def get_tableau(solver: str | ButcherTableau) -> ButcherTableau:
    """Look a solver up by name (or pass a tableau through)."""
    if isinstance(solver, ButcherTableau):
        return solver
    try:
        return TABLEAUX[solver]
    except KeyError:
        raise ValueError(
            f"unknown solver {solver!r}; valid solvers are: {', '.join(solver_names())}"
        ) from None
