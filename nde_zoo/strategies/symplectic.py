"""The symplectic adjoint method: the exact gradient of an RK solve, one field graph at a time.

Matsubara, Miyatake & Yaguchi, "Symplectic Adjoint Method for Exact Gradient of Neural
ODE with Minimal Memory" (NeurIPS 2021). The adjoint system is integrated by
the *symplectic partner* of the forward Runge-Kutta method (Sanz-Serna, SIAM Review
2016), which conserves the bilinear quantity ``lambda^T delta`` exactly, so the
gradient is that of the discretisation itself: identical to backprop through the solve
(:class:`~nde_zoo.strategies.Direct`) up to round-off.

Written as reverse-mode differentiation of one RK step, with the step

    X_i = y_n + h sum_{j<i} a_ij k_j,    k_i = f(t_n + c_i h, X_i),    y_{n+1} = y_n + h sum_i b_i k_i

the backward pass, given the cotangent ``ybar_{n+1}``, walks the stages in reverse:

    kbar_i = h b_i ybar_{n+1} + sum_{j>i} h a_ji Xbar_j
    Xbar_i = (df/dX)(X_i)^T kbar_i,   thetabar += (df/dtheta)(X_i)^T kbar_i
    ybar_n = ybar_{n+1} + sum_i Xbar_i

(the partner method of the paper, written for every tableau at once; stages with
``b_i = 0`` still count through ``a_ji``). Cotangents of intermediate outputs are added
as the walk reaches their step.

Memory: the forward pass runs without a graph and keeps only the state at each step
start (``N`` tensors of the state's size; step sizes are Python floats). The backward
pass recomputes one step's stage inputs without a graph (``s`` state-sized tensors), then
evaluates the field *with* a graph at one stage at a time and frees it after its
vector-Jacobian product: ``N`` states ``+ s`` stages ``+ L``, against ``N s L`` for
backprop. Cost: ``sN`` evaluations forward, about ``(2s - 1) N`` evaluations and ``sN``
VJPs backward (roughly 1.3 to 1.7x the time of backprop).

When not to use it: when the ``N`` stored states themselves do not fit (very many steps of
a large state: use :class:`Reversible`, flat in ``N``, or binomial checkpointing); when
the field is cheap and the graph small (plain :class:`Direct` is faster); when the field
is not deterministic (the recomputed stages must equal the forward ones: dropout or
sampling inside the field must be seeded per call, or the gradient is not exact).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from nde_zoo.solvers import ButcherTableau, stage_input
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution
from nde_zoo.driver.loop import Scheme

__all__ = ["Symplectic"]


def _stages_needed(tableau: ButcherTableau) -> list[bool]:
    """Which stages can carry a nonzero cotangent: ``b_i != 0`` or used by a needed later stage.

    The FSAL stage (``b_s = 0``, used by no later stage) is the one a tableau of the core
    leaves out; its vector-Jacobian product would be exactly zero.
    """
    s = tableau.stages
    needed = [False] * s
    for i in reversed(range(s)):
        needed[i] = tableau.b[i] != 0.0 or any(
            needed[j] and tableau.a[j][i] != 0.0 for j in range(i + 1, s)
        )
    return needed


class SymplecticScheme(Scheme):
    """The plain RK step, every step start stored, reversed by the symplectic partner's stage walk."""

    keeps = "every"

    def __init__(self, tableau: ButcherTableau) -> None:
        super().__init__(tableau)
        self.needed = _stages_needed(tableau)
        self.last = max(i for i, n in enumerate(self.needed) if n)

    def reverse(self, ops: Any, t: Tensor, h: Any, t_first: Tensor, state: Tensor, bar: Tensor) -> Any:
        def stage_vjp(t_i: Tensor, x: Tensor, kbar: Tensor) -> tuple[Tensor, Sequence[Tensor | None]]:
            _, xbar, pbars = ops.vjp(lambda f, x: f(t_i, x), x, kbar)
            return xbar, pbars

        ybar, pbars = _reverse_step(self.tableau, ops.field, stage_vjp, state, h,
                                    _stage_times(self.tableau, t, h, t_first), bar)
        return None, ybar, pbars

    def backward_nfe(self, steps: int) -> int:
        return steps * (self.last + sum(self.needed))


StageVJP = Callable[[Tensor, Tensor, Tensor], "tuple[Tensor, Sequence[Tensor | None]]"]


def _reverse_step(
    tableau: ButcherTableau,
    field: Callable[[Tensor, Tensor], Tensor],
    stage_vjp: StageVJP,
    y: Tensor,
    h: Any,
    stage_times: Sequence[Tensor],
    ybar: Tensor,
) -> tuple[Tensor, list[Tensor | None]]:
    """One step of the discrete adjoint, shared by the eager walk and the compiled scan.

    Recomputes the stage inputs ``X_i`` of the step from ``y`` (without a graph), then walks
    the stages backwards: ``kbar_i = h b_i ybar + sum_{j>i} h a_ji Xbar_j``, and
    ``stage_vjp(t_i, X_i, kbar_i)`` returns ``(Xbar_i, thetabar_i)``: one field graph at a time.

    Returns ``(ybar_n, thetabar)`` with ``thetabar`` the step's parameter cotangent (``None``
    entries where no stage reached a parameter).
    """
    needed = _stages_needed(tableau)
    last = max(i for i, n in enumerate(needed) if n)  # stages after it are never evaluated
    # 1. Recompute the stage inputs X_0..X_last without a graph (bitwise as in rk_step).
    xs: list[Tensor] = []
    ks: list[Tensor] = []
    with torch.no_grad():
        for i in range(last + 1):
            xs.append(y if i == 0 else stage_input(tableau, i, y, ks, h))
            if i < last:
                ks.append(field(stage_times[i], xs[i]))
    del ks
    # 2. Walk the stages backwards, one field graph alive at a time.
    xbars: list[Tensor | None] = [None] * (last + 1)
    param_grads: list[Tensor | None] = []
    for i in reversed(range(last + 1)):
        if not needed[i]:
            continue
        kbar = ybar * (h * tableau.b[i]) if tableau.b[i] != 0.0 else None
        for m in range(i + 1, last + 1):
            if tableau.a[m][i] != 0.0 and xbars[m] is not None:
                term = xbars[m] * (h * tableau.a[m][i])
                kbar = term if kbar is None else kbar + term
        if kbar is None:
            continue
        xbars[i], pbars = stage_vjp(stage_times[i], xs[i], kbar)
        if not param_grads:
            param_grads = [None] * len(pbars)
        for p, pbar in enumerate(pbars):
            if pbar is not None:
                param_grads[p] = pbar if param_grads[p] is None else param_grads[p] + pbar
    for xbar in xbars:
        if xbar is not None:
            ybar = ybar + xbar
    return ybar, param_grads


def _stage_times(tableau: ButcherTableau, t: Tensor, h: Any, t_first: Tensor) -> list[Tensor]:
    """The times of the stages the forward step evaluated; the first is ``t_first``.

    An FSAL stage of the previous step was evaluated at ``t_{n-1} + h_{n-1}``, a tensor sum that
    may differ from ``t_n`` in the last bit, so the caller passes it.
    """
    return [t_first] + [t + tableau.c[i] * h for i in range(1, tableau.stages)]


class Symplectic(ODEStrategy):
    """The symplectic adjoint method (Matsubara et al., 2021): exact gradient, minimal memory.

    Gradient: that of the RK discretisation, equal to :class:`Direct`'s up to round-off,
    for every tableau, fixed or adaptive (step sizes carry no gradient), with losses on
    any output times. Memory: the state at each of the ``N`` step starts (kept without a
    graph) plus one step's ``s`` stage inputs and *one* field graph during backward,
    against ``N s L`` for backprop. Time: ``sN`` evaluations forward; ``(2s - 1) N``
    evaluations (one graph-free recomputation, one with a graph) and ``sN`` VJPs backward.

    Args: as :class:`ODEStrategy` (``solver``; ``steps``/``step_size`` or
    ``rtol``/``atol``/``max_steps``).

    Shapes: ``y0`` ``(batch, *state)``; ``solve(...).ys`` ``(len(ts), batch, *state)``.
    The field must be deterministic (recomputed stages must equal the forward ones) and may
    depend only on the state, the time and its own parameters (a tensor it closes over
    that requires grad raises an error during backward). Not for: memory dominated by the
    ``N`` states themselves (use :class:`Reversible`), cheap fields with small graphs
    (:class:`Direct` is faster).
    """

    name = "symplectic"
    compilable = True
    exact = True

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        with SavedBytes() as saved:
            ys, stats, path = self.drive(SymplecticScheme(self.tableau), field, y0, ts, params)
        return self._record(Solution(ys, ts, stats, path, saved_bytes=saved.nbytes))
