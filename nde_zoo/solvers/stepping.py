"""How steps are chosen: a fixed grid, or an adaptive PI controller.

The adaptive controller mirrors torchdiffeq's defaults (safety 0.9, growth at most 10x,
shrink at most 5x, exponent 1/order, Hairer's initial step, RMS error norm) so that
forward NFE is comparable; unlike torchdiffeq it *lands* on every output time instead of
interpolating past it, so every strategy can replay exactly the same discretisation.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nde_zoo.solvers.rk import Field
from nde_zoo.solvers.tableau import ButcherTableau, solver_names, TABLEAUX

__all__ = ["Stepping", "PIController", "rms_norm", "error_ratio", "initial_step_size", "fixed_grid"]

DEFAULT_MAX_STEPS = 10_000


@dataclass(frozen=True)
class Stepping:
    """Fixed (``steps`` or ``step_size``) or adaptive (``rtol``/``atol``) stepping.

    ``steps`` counts uniform steps over the whole span ``[ts[0], ts[-1]]``; output times
    between grid points are landed on exactly. ``step_size`` fixes ``h`` instead.
    Adaptive stepping takes at most ``max_steps`` attempted steps, then raises.
    """

    steps: int | None = None
    step_size: float | None = None
    rtol: float | None = None
    atol: float | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    dt0: float | None = None

    def __post_init__(self) -> None:
        fixed = [n for n, v in (("steps", self.steps), ("step_size", self.step_size)) if v is not None]
        if len(fixed) == 2:
            raise ValueError("give either steps= or step_size=, not both")
        if fixed and (self.rtol is not None or self.atol is not None):
            raise ValueError(
                f"{fixed[0]}= asks for fixed steps but rtol/atol ask for adaptive steps; give one of them"
            )
        if self.steps is not None and (int(self.steps) != self.steps or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.step_size is not None and not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"step_size must be a positive finite number, got {self.step_size!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
        if self.adaptive and (self.rtol or 0.0) == 0.0 and (self.atol or 0.0) == 0.0:
            raise ValueError("rtol and atol are both zero: no step would ever be accepted")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps!r}")

    @classmethod
    def of(
        cls,
        *,
        steps: int | None = None,
        step_size: float | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        dt0: float | None = None,
    ) -> Stepping:
        """Fill adaptive defaults (``rtol=1e-3``, ``atol=1e-6``) when only one tolerance is given."""
        if steps is None and step_size is None:
            rtol = 1e-3 if rtol is None else rtol
            atol = 1e-6 if atol is None else atol
        return cls(steps, step_size, rtol, atol, max_steps, dt0)

    @property
    def adaptive(self) -> bool:
        return self.steps is None and self.step_size is None

    def check(self, tableau: ButcherTableau) -> None:
        """Refuse adaptive stepping with a solver that has no error estimate."""
        if self.adaptive and not tableau.adaptive:
            pairs = ", ".join(n for n in solver_names() if TABLEAUX[n].adaptive)
            raise ValueError(
                f"solver {tableau.name!r} has no embedded error estimate, so it cannot take adaptive "
                f"steps: give steps= or step_size=, or choose one of {pairs}"
            )

    def describe(self) -> str:
        if self.steps is not None:
            return f"steps={self.steps}"
        if self.step_size is not None:
            return f"step_size={self.step_size}"
        return f"rtol={self.rtol}, atol={self.atol}, max_steps={self.max_steps}"


def rms_norm(x: Tensor) -> Tensor:
    """Root mean square over every element (torchdiffeq's default norm).

    Its gradient at ``x = 0`` is 0, not ``sqrt``'s NaN: regularisers differentiate this norm
    of an error estimate (ERNODE), and a field that vanishes on an interval (a CDE's control
    held constant past the end of a short series) gives an error of exactly zero there.
    """
    mean_square = x.pow(2).mean()
    nonzero = mean_square != 0  # True for NaN too: a NaN error must stay NaN (and be rejected)
    return torch.where(nonzero, mean_square, 1.0).sqrt() * nonzero  # same value; safe gradient


def error_ratio(error: Tensor, y0: Tensor, y1: Tensor, rtol: float, atol: float) -> Tensor:
    """``RMS(error / (atol + rtol * max(|y0|, |y1|)))``: accept a step when <= 1."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return rms_norm(error / scale)


@dataclass(frozen=True)
class PIController:
    """PI step-size control, ``h_new = h * safety * r_n^(-icoeff/k) * r_{n-1}^(pcoeff/k)``.

    ``k`` is the order of the method. Defaults are torchdiffeq's pure I-controller
    (``pcoeff=0``) so NFE matches it; set ``pcoeff`` (e.g. 0.4 with ``icoeff`` 0.3...0.7,
    Hairer & Wanner IV.2) for smoother step sequences on oscillatory problems.
    """

    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    icoeff: float = 1.0
    pcoeff: float = 0.0

    def propose(self, h: float, ratio: float, prev_ratio: float, order: int) -> float:
        if ratio == 0.0:
            return h * self.ifactor
        factor = self.safety * ratio ** (-self.icoeff / order)
        if self.pcoeff and prev_ratio > 0.0:
            factor *= prev_ratio ** (self.pcoeff / order)
        lower = 1.0 if ratio < 1.0 else self.dfactor  # never shrink after an accepted step
        return h * min(self.ifactor, max(factor, lower))


def initial_step_size(
    field: Field, t0: Tensor, y0: Tensor, f0: Tensor, order: int, rtol: float, atol: float
) -> float:
    """Hairer, Norsett & Wanner (1993), II.4: the starting step; costs one evaluation."""
    scale = atol + y0.abs() * rtol
    d0 = rms_norm(y0 / scale).item()
    d1 = rms_norm(f0 / scale).item()
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = y0 + h0 * f0
    f1 = field(t0 + h0, y1)
    d2 = rms_norm((f1 - f0) / scale).item() / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


def fixed_grid(ts: Sequence[float], stepping: Stepping) -> list[float]:
    """The times of a fixed-step solve: a uniform grid over ``[ts[0], ts[-1]]`` merged with ``ts``.

    Grid points closer than ``1e-10 * span`` to an output time are replaced by it, so
    no sliver steps appear and every output time is hit exactly.
    """
    return list(fixed_grid_array(ts, stepping))


def fixed_grid_array(ts: Sequence[float], stepping: Stepping) -> array:
    """:func:`fixed_grid` as an ``array('d')`` built point by point: 8 bytes a step at its peak
    (a 10^6-step grid built in lists of Python floats grew peak RSS by 95 MiB)."""
    t0, t1 = ts[0], ts[-1]
    span = t1 - t0
    direction = 1.0 if span >= 0 else -1.0
    if stepping.steps is not None:
        n = int(stepping.steps)
        uniform: Iterable[float] = (t0 + span * k / n for k in range(1, n))
    else:
        h = float(stepping.step_size)  # type: ignore[arg-type]
        n = math.ceil(abs(span) / h - 1e-9)
        uniform = (t0 + direction * h * k for k in range(1, n))
    tol = 1e-10 * max(abs(span), 1e-300)
    out = array("d")
    j = 0  # next output time to place
    for t in itertools.chain(uniform, (t1,)):
        while j < len(ts) and (ts[j] - t) * direction <= tol:
            if not out or ts[j] != out[-1]:
                out.append(ts[j])
            j += 1
        if (t - out[-1]) * direction > tol:
            out.append(t)
    return out
