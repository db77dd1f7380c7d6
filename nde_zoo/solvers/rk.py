"""One generic explicit Runge-Kutta step, serving every tableau.

The step returns what the strategies need (diffrax's ``AbstractSolver.step``): the new
state, the embedded error estimate, and the stages. It is a pure function of tensors,
so it can be replayed exactly (symplectic adjoint, checkpointing), inverted (reversible)
and differentiated (direct backprop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from nde_zoo.solvers.tableau import ButcherTableau

__all__ = ["Field", "StepResult", "StepSize", "rk_increment", "rk_step", "stage_input"]

Field = Callable[[Tensor, Tensor], Tensor]


class StepResult(NamedTuple):
    """The outcome of one RK step from ``(t, y)`` with step ``h``.

    Attributes:
        y: the new state, ``y + h * sum_i b_i k_i``; shape of ``y``.
        error: ``h * sum_i b_error_i k_i`` (shape of ``y``) or ``None`` without an embedded pair.
        stages: the ``s`` stage derivatives ``k_i = f(t + c_i h, X_i)``. For an FSAL tableau the
            last one is ``f(t + h, y_new)``, reusable as the next step's first stage.
    """

    y: Tensor
    error: Tensor | None
    stages: list[Tensor]


StepSize = float | Tensor


def _axpy(out: Tensor, k: Tensor, coefficient: StepSize) -> Tensor:
    """``out + coefficient * k``.

    A Python-float step size (the eager loops) uses ``torch.add(..., alpha=)``, one kernel; a 0-d
    tensor step size (the compiled scans of :mod:`nde_zoo.driver.loop`, where ``h`` is
    an element of the step-size tensor) multiplies instead. Same formula, so one step function
    serves both paths.
    """
    if isinstance(coefficient, Tensor):
        return out + k * coefficient
    return torch.add(out, k, alpha=coefficient)


def _combine(y: Tensor, ks: Sequence[Tensor], weights: Sequence[float], h: StepSize) -> Tensor:
    """``y + h * sum_j weights[j] * ks[j]``, skipping zero weights (one kernel per term)."""
    out = y
    for k, w in zip(ks, weights):
        if w != 0.0:
            out = _axpy(out, k, h * w)
    return out


def _weighted_sum(ks: Sequence[Tensor], weights: Sequence[float], h: StepSize) -> Tensor:
    """``h * sum_j weights[j] * ks[j]`` (at least one weight is nonzero)."""
    out: Tensor | None = None
    for k, w in zip(ks, weights):
        if w != 0.0:
            out = k * (h * w) if out is None else _axpy(out, k, h * w)
    assert out is not None
    return out


def stage_input(tableau: ButcherTableau, i: int, y: Tensor, ks: Sequence[Tensor], h: StepSize) -> Tensor:
    """The state ``X_i = y + h sum_{j<i} a_ij k_j`` at which stage ``i`` is evaluated."""
    return _combine(y, ks, tableau.a[i], h)


def rk_step(
    field: Field,
    t: Tensor,
    y: Tensor,
    h: StepSize,
    tableau: ButcherTableau,
    k1: Tensor | None = None,
) -> StepResult:
    """Take one explicit RK step.

    Args:
        field: ``f(t, y) -> dy/dt`` with ``y`` of shape ``(batch, *state)``.
        t: the step's start time, a 0-d tensor.
        y: the state at ``t``, shape ``(batch, *state)``.
        h: the step size, a Python float (eager loops) or a 0-d tensor (compiled scans);
            negative steps integrate backwards in time.
        tableau: the method.
        k1: ``f(t, y)`` if already known (first-same-as-last reuse).

    Returns:
        :class:`StepResult`. Evaluates the field ``s`` times, ``s - 1`` when ``k1`` is given.
    """
    ks: list[Tensor] = []
    for i in range(tableau.stages):
        if i == 0:
            ks.append(field(t, y) if k1 is None else k1)
            continue
        if tableau.fsal and i == tableau.stages - 1:
            y_new = _combine(y, ks, tableau.b, h)
            ks.append(field(t + h, y_new))
            break
        ks.append(field(t + tableau.c[i] * h, _combine(y, ks, tableau.a[i], h)))
    else:
        y_new = _combine(y, ks, tableau.b, h)
    error = None
    if tableau.b_error is not None:
        error = _weighted_sum(ks, tableau.b_error, h)
    return StepResult(y_new, error, ks)


def rk_increment(
    field: Field, t: Tensor, y: Tensor, h: StepSize, tableau: ButcherTableau
) -> tuple[Tensor, Tensor | None]:
    """``Psi_h(t, y) = Phi_h(t, y) - y = h sum_i b_i k_i`` and the embedded error estimate.

    Computed directly (not as a difference of states), so no rounding of ``y`` enters the
    increment: what the reversible solvers add and later subtract is the same number.
    """
    ks: list[Tensor] = []
    increment: Tensor | None = None
    for i in range(tableau.stages):
        if i == 0:
            ks.append(field(t, y))
            continue
        if tableau.fsal and i == tableau.stages - 1:
            increment = _weighted_sum(ks, tableau.b, h)
            ks.append(field(t + h, y + increment))
            break
        ks.append(field(t + tableau.c[i] * h, _combine(y, ks, tableau.a[i], h)))
    if increment is None:
        increment = _weighted_sum(ks, tableau.b, h)
    error = None
    if tableau.b_error is not None:
        error = _weighted_sum(ks, tableau.b_error, h)
    return increment, error
