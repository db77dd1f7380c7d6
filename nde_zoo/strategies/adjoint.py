"""The continuous adjoint (Chen et al., 2018) and the seminorm adjoint (Kidger et al., 2021).

Both run torchdiffeq's ``odeint_adjoint``: the backward pass solves the adjoint ODE
backwards in time with its own adaptive steps, so memory is O(L) but the gradient is only
as exact as the two solves' tolerances (not the gradient of the forward discretisation).
The seminorm drops the parameter-gradient channels from the accept/reject test of the
adjoint solve (they are integrals, never fed back), so fewer backward steps are rejected
(Kidger, Chen & Lyons, "Hey, that's not an ODE", ICML 2021). It also drops the time-gradient channel ``a_t`` when ``ts`` needs no gradient,
as the paper's own code does; torchdiffeq's built-in ``norm="seminorm"`` keeps ``|a_t|``,
and on a field with explicit time dependence (a Neural CDE, whose ``dX/dt`` has a kink at
every knot) that one channel sets the step size: 3.7x more backward steps than the paper's
seminorm (docs/seminorm.md).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torchdiffeq
from torch import Tensor, nn

from nde_zoo.solvers import (
    ButcherTableau,
    CountedField,
    MaxStepsExceeded,
    NonFiniteStateError,
    SolveStats,
    StepSizeUnderflow,
    check_finite_outputs,
    check_inputs,
)
from nde_zoo.solvers.stepping import fixed_grid, rms_norm
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution, takes_stepping
from nde_zoo.driver.fields import inspect_field
from nde_zoo.strategies.sde import solve_sde

__all__ = ["Adjoint", "Seminorm", "TORCHDIFFEQ_METHODS"]

#: our solver names -> torchdiffeq's methods (its "rk4" is Kutta's 3/8 rule, our "rk38").
TORCHDIFFEQ_METHODS = {"euler": "euler", "midpoint": "midpoint", "rk38": "rk4", "heun": "adaptive_heun",
                       "bosh3": "bosh3", "dopri5": "dopri5"}
#: with ``steps``/``step_size``: torchdiffeq's fixed-grid method for each of ours. heun, bosh3 and
#: dopri5 are adaptive there (its ``adaptive_heun`` reuses the predictor's slope, not Heun's method);
#: ``heun2`` *is* Heun's method on a grid. bosh3 and dopri5 have no fixed-grid form: they run
#: pinned to the grid (see :func:`_pinned_to_grid`).
FIXED_GRID_METHODS = {"euler": "euler", "midpoint": "midpoint", "rk38": "rk4", "heun": "heun2"}
ADJOINT_NORMS = ("default", "rms", "seminorm", "torchdiffeq_seminorm", "torchdiffeq_2020")


def _rms_over_everything(tensor_tuple: Any) -> Tensor:
    """A plain RMS over the whole augmented adjoint state: the seminorm paper's baseline."""
    return rms_norm(torch.cat([t.reshape(-1) for t in tensor_tuple]) if isinstance(tensor_tuple, tuple)
                    else tensor_tuple)


def _torchdiffeq_2020_norm(tensor_tuple: tuple[Tensor, ...]) -> Tensor:
    """``max(|a_t|, rms(z), rms(a_z), rms(a_theta))``, all parameters as *one* group.

    torchdiffeq's default adjoint norm when the seminorm paper was written (v0.1.1, 2020; its
    ``adjoint.py`` then built ``_mixed_linf_rms_norm`` over ``[a_t, y, adj_y, all params]``):
    the "Default norm" of the paper's tables. Today's default splits ``a_theta`` per tensor.
    """
    a_t, state, adjoint_state, *param_adjoints = tensor_tuple
    parts = [rms_norm(state), rms_norm(adjoint_state), a_t.abs().max()]
    if param_adjoints:
        parts.append(rms_norm(torch.cat([p.reshape(-1) for p in param_adjoints])))
    return torch.stack(parts).max()


def _seminorm_without_time(tensor_tuple: tuple[Tensor, ...]) -> Tensor:
    """``max(rms(z), rms(a_z))``: the paper's seminorm, parameter and time channels dropped.

    torchdiffeq hands a custom norm ``(a_t, z, a_z, *a_theta)`` for a tensor state.
    """
    _, state, adjoint_state, *_ = tensor_tuple
    return torch.maximum(rms_norm(state), rms_norm(adjoint_state))


class _OnGrid:
    """A torchdiffeq ``grid_constructor``: the fixed grid's points between the requested times.

    torchdiffeq calls it once for the forward solve (``t`` = every output time) and, in the
    adjoint's backward pass, once per interval between two output times (``t`` decreasing);
    each gets the points of the same grid, so both passes step on exactly the forward's grid.
    """

    def __init__(self, grid: list[float]) -> None:
        self.grid = grid  # every step boundary, output times included (solvers.stepping.fixed_grid)

    def __call__(self, func: Any, y0: Tensor, t: Tensor) -> Tensor:
        a, b = float(t[0]), float(t[-1])
        lo, hi = min(a, b), max(a, b)
        points = sorted({g for g in self.grid if lo < g < hi} | {a, b}, reverse=a > b)
        return torch.unique_consecutive(torch.tensor(points, dtype=t.dtype, device=t.device))


def _pinned_to_grid(grid: list[float]) -> dict[str, Any]:
    """torchdiffeq options that make an adaptive RK solver (bosh3, dopri5) take exactly ``grid``'s steps.

    With ``atol=inf`` (and ``rtol=0``) every step is accepted; a first and maximal step of twice
    the span is cut by ``step_t`` at the next grid point, every time, so the solver steps from
    grid point to grid point: ``1 + (s - 1) N`` evaluations for an FSAL pair of ``s`` stages.
    The backward solve gets the same options, so it steps on the same grid backwards.
    """
    span = abs(grid[-1] - grid[0])
    return dict(step_t=torch.tensor(grid, dtype=torch.float64), first_step=2 * span, max_step=2 * span)


class _CountingField(nn.Module):
    """Holds the user's field as a submodule (so its parameters are the adjoint's) and counts calls.

    Calls during the forward solve go to ``nfe_forward``; after it returns, to ``nfe_backward``.
    """

    def __init__(self, field: Any, stats: SolveStats) -> None:
        super().__init__()
        self.field = field  # registered as a submodule when it is an nn.Module
        self.stats = stats
        self.forward_done = False
        self.checked = False

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        if self.forward_done:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        out = self.field(t, y)
        if not self.checked:  # the same explanation of a wrong output shape as every other strategy
            CountedField._check(y, out)
            self.checked = True
        return out


class Adjoint(ODEStrategy):
    """The continuous adjoint method on ``torchdiffeq.odeint_adjoint``.

    Gradient: approximate (the adjoint ODE is solved to ``adjoint_rtol``/``adjoint_atol``,
    defaulting to the forward tolerances). Memory: O(L), independent of the number of steps.
    Not recommended when exact gradients matter (use :class:`Symplectic` or
    :class:`Reversible`), on stiff or chaotic problems where the backward solve of the
    state diverges from the forward one, or with few large steps.

    Args:
        solver: one of torchdiffeq's methods under our names: euler, midpoint, rk38 (its
            ``rk4``), heun (``adaptive_heun``), bosh3, dopri5.
        steps / step_size / rtol / atol / max_steps: as :class:`ODEStrategy`. Fixed steps are the
            zoo's grid (uniform over ``[ts[0], ts[-1]]``, every output time landed on) for the
            forward *and* the backward solve, with every solver: heun runs torchdiffeq's ``heun2``
            (Heun's method), bosh3 and dopri5 their adaptive solver pinned to the grid (every step
            accepted), so ``steps=4`` costs 4 s evaluations (``1 + 4 (s - 1)`` for an FSAL pair).
        adjoint_rtol / adjoint_atol: tolerances of the backward solve (default: the forward ones).
        adjoint_norm: ``"default"`` (torchdiffeq's own mixed norm ``max(|a_t|, rms(z), rms(a_z),
            max_p rms(a_p))``), ``"rms"`` (plain RMS over the whole augmented adjoint state),
            ``"seminorm"`` (Kidger et al.: ``max(rms(z), rms(a_z))``, plus ``|a_t|`` only when
            ``ts`` requires grad), ``"torchdiffeq_seminorm"`` (torchdiffeq's ``norm="seminorm"``,
            which always keeps ``|a_t|``) or ``"torchdiffeq_2020"`` (the paper's baseline, torchdiffeq's
            default in 2020: ``max(|a_t|, rms(z), rms(a_z), rms(a_theta))`` with every parameter in one group).
    """

    name = "adjoint"
    kinds = frozenset({"ode", "sde"})

    @takes_stepping
    def __init__(
        self,
        solver: str | ButcherTableau = "dopri5",
        *,
        adjoint_rtol: float | None = None,
        adjoint_atol: float | None = None,
        adjoint_norm: str = "default",
        **stepping: Any,
    ) -> None:
        super().__init__(solver, **stepping)  # refuses compile=True, naming the strategies that have it
        if self.tableau.name not in TORCHDIFFEQ_METHODS:
            raise ValueError(
                f"strategy {self.name!r} runs torchdiffeq, which has no {self.tableau.name!r} solver; choose one "
                f"of {', '.join(sorted(TORCHDIFFEQ_METHODS))} (or use strategy=symplectic / reversible, which "
                f"take every solver)"
            )
        if adjoint_norm not in ADJOINT_NORMS:
            raise ValueError(f"adjoint_norm must be one of {', '.join(ADJOINT_NORMS)}, got {adjoint_norm!r}")
        self.method = TORCHDIFFEQ_METHODS[self.tableau.name]
        if not self.stepping.adaptive:  # steps= / step_size= mean fixed steps here too
            self.method = FIXED_GRID_METHODS.get(self.tableau.name, self.method)
        self.adjoint_rtol = adjoint_rtol
        self.adjoint_atol = adjoint_atol
        self.adjoint_norm = adjoint_norm

    def _options(self, times: list[float], backward: bool = False) -> dict[str, Any]:
        """torchdiffeq's options: fixed steps on our grid (``fixed_grid``, output times landed on), or adaptive.

        ``backward``: the adjoint's options. For decreasing ``ts``, ``odeint_adjoint`` runs the
        backward pass in negated time without flipping ``adjoint_options``, so the grid is negated there.
        """
        st = self.stepping
        if st.adaptive:
            return dict(max_num_steps=st.max_steps)
        if len(times) < 2:
            return {}
        grid = fixed_grid(times, st)
        if backward and times[-1] < times[0]:
            grid = [-t for t in grid]
        if self.method in FIXED_GRID_METHODS.values():
            return dict(grid_constructor=_OnGrid(grid))
        return dict(_pinned_to_grid(grid), max_num_steps=st.max_steps)

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        times = check_inputs(y0, ts)
        # torchdiffeq differentiates only adjoint_params: give it every tensor the field reads
        # (a closure's module included), or refuse what it cannot differentiate, before solving.
        params = inspect_field(field, ts[0], y0, self.name, params=params, recomputes=False)
        stats = SolveStats()
        wrapped = _CountingField(field, stats)
        options = self._options(times)
        adaptive = self.stepping.adaptive
        kwargs: dict[str, Any] = dict(method=self.method, options=options)
        adjoint_options: dict[str, Any] = self._options(times, backward=True)
        if "step_t" in options:  # an adaptive pair pinned to the fixed grid: accept every step
            kwargs.update(rtol=0.0, atol=math.inf, adjoint_rtol=0.0, adjoint_atol=math.inf)
        if adaptive:
            kwargs.update(rtol=self.stepping.rtol, atol=self.stepping.atol)
            kwargs.update(adjoint_rtol=self.adjoint_rtol or self.stepping.rtol,
                          adjoint_atol=self.adjoint_atol or self.stepping.atol)
            if self.adjoint_norm == "torchdiffeq_seminorm" or (self.adjoint_norm == "seminorm" and ts.requires_grad):
                adjoint_options["norm"] = "seminorm"  # keeps |a_t|: needed when ts has a gradient
            elif self.adjoint_norm != "default":
                adjoint_options["norm"] = {"seminorm": _seminorm_without_time, "rms": _rms_over_everything,
                                           "torchdiffeq_2020": _torchdiffeq_2020_norm}[self.adjoint_norm]
        kwargs["adjoint_options"] = adjoint_options
        kwargs["adjoint_params"] = tuple(params)
        try:
            with SavedBytes() as saved:
                ys = torchdiffeq.odeint_adjoint(wrapped, y0, ts, **kwargs)
        except AssertionError as exc:
            raise _translate(exc, self, field, y0, ts) from exc
        wrapped.forward_done = True
        check_finite_outputs(ys, times, field)
        return self._record(Solution(ys, ts, stats, None, saved_bytes=saved.nbytes))

    def solve_sde(self, sde: Any, y0: Tensor, ts: Tensor, bm: Any, dt: float | None = None) -> Solution:
        """An SDE by torchsde's stochastic adjoint, ``sdeint_adjoint`` (see :mod:`nde_zoo.strategies.sde`)."""
        return solve_sde(self, sde, y0, ts, bm, route="adjoint", dt=dt)


def _translate(exc: AssertionError, strategy: Adjoint, field: Any, y0: Tensor, ts: Tensor) -> Exception:
    message = str(exc)
    if "max_num_steps" in message:
        return MaxStepsExceeded(
            f"torchdiffeq used up max_steps={strategy.stepping.max_steps} ({message}); raise max_steps, "
            f"loosen rtol/atol, or check that the dynamics are not stiff or blowing up"
        )
    if "underflow" not in message and "non-finite" not in message:
        return exc
    with torch.no_grad():
        f0 = field(ts[0], y0)
    if not bool(torch.isfinite(f0).all()):
        return NonFiniteStateError(
            f"the vector field returned NaN or infinity at t={float(ts[0])} for a finite initial state "
            f"({message}): its parameters or its inputs hold NaN/inf (a diverged training step?); check "
            f"the field's weights and any tensors it reads, e.g. a CDE's interpolated data"
        )
    if not strategy.stepping.adaptive or "non-finite" in message:
        return NonFiniteStateError(
            f"the {strategy.name} solve became NaN or infinite on its fixed grid ({message}): the dynamics "
            f"blew up or the step is too large; reduce the step size or use an adaptive solver"
        )
    return StepSizeUnderflow(
        f"torchdiffeq's step size underflowed ({message}): the dynamics are stiff or singular, or the field "
        f"returned NaN/inf part-way through the solve (torchdiffeq rejects such steps until the step "
        f"underflows): loosen rtol/atol, use float64, regularise the model, or check the field for NaN/inf"
    )


class Seminorm(Adjoint):
    """The continuous adjoint with the seminorm on the backward solve (Kidger et al., 2021).

    Same gradient quality and memory as :class:`Adjoint`; fewer backward steps on adaptive
    solves, most on fields with explicit time dependence (Neural CDEs: 0.24-0.34x the backward
    NFE of the paper's own baseline, torchdiffeq's 2020 default) and when a few small parameter
    tensors would set the steps. A plain RMS over every channel is more lenient still on a
    trained model at loose tolerances (docs/seminorm.md).
    """

    name = "seminorm"
    kinds = frozenset({"ode"})  # the seminorm is an ODE adjoint-norm choice: no SDE form

    def __init__(self, solver: str | ButcherTableau = "dopri5", **arguments: Any) -> None:
        if "adjoint_norm" in arguments:
            raise TypeError("Seminorm fixes adjoint_norm='seminorm'; for another norm use Adjoint(adjoint_norm=...)")
        super().__init__(solver, adjoint_norm="seminorm", **arguments)


# Adjoint's arguments, less the norm Seminorm fixes (help(), saved configs, the config drift test)
Seminorm.__init__.__signature__ = inspect.signature(Adjoint.__init__).replace(  # type: ignore[attr-defined]
    parameters=[p for p in inspect.signature(Adjoint.__init__).parameters.values() if p.name != "adjoint_norm"])
