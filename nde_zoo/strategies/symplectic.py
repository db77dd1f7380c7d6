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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nde_zoo.solvers import (
    ButcherTableau,
    CountedField,
    Path,
    SolveStats,
    Stepping,
    check_finite_outputs,
    check_inputs,
    fixed_path,
    initial_step_size,
    integrate,
    rk_stepper,
    stage_input,
)
from nde_zoo.strategies._autograd import _detached, _identity, check_no_hidden_inputs, vjp
from nde_zoo.strategies._compiled import (
    Grid,
    Programs,
    _fresh,
    func_vjp,
    functional_field,
    functional_names,
    row,
    scan,
    scan_forward,
)
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution
from nde_zoo.strategies.fields import inspect_field

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


@dataclass
class _Problem:
    """What the autograd Function needs besides its tensor inputs (no tensors kept here)."""

    field: Any
    params: list[Tensor]
    tableau: ButcherTableau
    stepping: Stepping
    times_out: list[float]
    time_dtype: torch.dtype
    time_device: torch.device
    strategy: str
    programs: Programs | None = None  # set when compile= asks for compiled fixed-step loops
    step_factory: Any = None  # adaptive with compile=: the compiled step
    # filled by forward:
    path: Path | None = None
    stats: SolveStats | None = None
    grid: Grid | None = None  # the compiled forward's grid, reused by the compiled backward

    def time(self, t: float) -> Tensor:
        """The 0-d time tensor the stepping loop passes for ``t`` (``t_like.new_tensor(t)``)."""
        return torch.tensor(t, dtype=self.time_dtype, device=self.time_device)


def _forward_solve(problem: _Problem, y0: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Plain RK without a graph; returns ``ys`` and the state at each accepted step start.

    The same loop and arithmetic as :func:`nde_zoo.solvers.odeint`, so the accepted steps
    are those :class:`Direct` takes (``Path.sizes``: the step sizes exactly as taken).
    """
    if problem.programs is not None:
        compiled = _forward_compiled(problem, y0)
        if compiled is not None:
            return compiled
    tableau, stepping = problem.tableau, problem.stepping
    counted = CountedField(problem.field)
    t_like = problem.time(problem.times_out[0])
    step = rk_stepper(counted, tableau) if problem.step_factory is None else problem.step_factory(counted)

    first_step = None
    if stepping.adaptive and stepping.dt0 is None:

        def first_step() -> float:
            f0 = counted(t_like, y0)
            return initial_step_size(
                counted, t_like, y0, f0, tableau.order - 1, float(stepping.rtol or 0.0),
                float(stepping.atol or 0.0),
            )

    outputs, path, stats = integrate(
        step, y0, lambda y: y, problem.times_out, t_like, stepping, tableau.order,
        first_step=first_step, record_states=True,
    )
    ys = torch.stack(outputs)  # (len(ts), batch, *state)
    check_finite_outputs(ys, problem.times_out, problem.field)
    stats.nfe_forward = counted.nfe
    states = path.states
    problem.path = Path(times=path.times, output_steps=path.output_steps, sizes=path.sizes)
    problem.stats = stats
    return ys, states


class _SymplecticAdjoint(torch.autograd.Function):
    """``ys = solve(y0; params)``; the parameters are explicit inputs (so DDP's reducer hooks fire)."""

    @staticmethod
    def forward(ctx: Any, problem: _Problem, y0: Tensor, *params: Tensor) -> Tensor:
        # Hooks nest: the identity pair shadows an outer SavedBytes while the field runs (a
        # CNF field builds and frees a graph of its own inside), so what is counted is
        # exactly what this Function keeps for backward.
        with torch.autograd.graph.saved_tensors_hooks(_detached, _identity):
            ys, states = _forward_solve(problem, y0)
        ctx.problem = problem
        # N states at the step starts (states[0] is y0): a list eagerly, one (N, batch, ...) tensor compiled
        ctx.save_for_backward(*states) if isinstance(states, list) else ctx.save_for_backward(states)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        states: Sequence[Tensor] = ctx.saved_tensors
        grads = None
        if problem.grid is not None:
            grads = _backward_compiled(problem, states[0], grad_ys)
        if grads is None:
            if problem.grid is not None:  # the compiled backward fell back: unstack the states
                states = list(states[0].unbind(0))
            grads = _backward_walk(problem, states, grad_ys)
        return (None, *grads)


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


def _backward_walk(problem: _Problem, states: Sequence[Tensor], grad_ys: Tensor) -> list[Tensor | None]:
    """The discrete adjoint, step by step from the end; returns ``[ybar_0, *thetabar]``."""
    tableau, params = problem.tableau, problem.params
    path, stats = problem.path, problem.stats
    assert path is not None and stats is not None
    hs = path.sizes  # exactly as taken
    output_at: dict[int, list[int]] = {}
    for j, n in enumerate(path.output_steps):
        output_at.setdefault(n, []).append(j)
    param_grads: list[Tensor | None] = [None] * len(params)
    checked = False
    counted = CountedField(problem.field)

    def stage_vjp(t: Tensor, x: Tensor, kbar: Tensor) -> tuple[Tensor, Sequence[Tensor | None]]:
        nonlocal checked
        leaf = x.detach().requires_grad_()
        with torch.enable_grad():
            k = counted(t, leaf)
        if not checked:
            check_no_hidden_inputs(k, [leaf, *params], problem.strategy)
            checked = True
        xbar, *pbars = vjp(k, [leaf, *params], kbar)
        return (torch.zeros_like(x) if xbar is None else xbar), pbars  # k's graph is freed on return

    ybar = torch.zeros_like(grad_ys[0])  # (batch, *state)
    for j in output_at.get(path.steps, []):
        ybar = ybar + grad_ys[j]
    for n in reversed(range(path.steps)):
        y, h = states[n], hs[n]
        t = problem.time(path.times[n])
        t_first = problem.time(path.times[n - 1]) + hs[n - 1] if tableau.fsal and n > 0 else t
        ybar, pbars = _reverse_step(tableau, counted, stage_vjp, y, h, _stage_times(tableau, t, h, t_first), ybar)
        for p, pbar in enumerate(pbars):
            if pbar is not None:
                param_grads[p] = pbar if param_grads[p] is None else param_grads[p] + pbar
        for j in output_at.get(n, []):
            ybar = ybar + grad_ys[j]
    stats.nfe_backward += counted.nfe
    return [ybar, *param_grads]


def _forward_compiled(problem: _Problem, y0: Tensor) -> tuple[Tensor, Tensor] | None:
    """The forward solve as one compiled scan keeping every step start; ``None`` if it fell back."""
    assert problem.programs is not None
    path = fixed_path(problem.times_out, problem.stepping)
    grid = Grid.of(path.times, path.sizes, path.output_steps, y0)
    field, tableau, layout = problem.field, problem.tableau, grid.layout

    def build() -> Callable[..., Any]:
        def program(field: Any, y0: Tensor, times: Tensor, sizes: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
            step = rk_stepper(field, tableau)  # the eager loop's step
            k1 = field(times[0], y0) if tableau.fsal else None  # the first step's stage, as rk_step takes it
            ys, _, states = scan_forward(step, y0, k1, lambda y: y, times, sizes, layout, index, every_state=True)
            return ys, states

        return program

    key = problem.programs.key("symplectic/forward", field, [y0], (tableau.name, layout))
    if problem.programs.first_call(key):
        CountedField(field)(problem.time(problem.times_out[0]), y0)  # shape check, as the eager loop's
    result = problem.programs.run(key, build, field, y0, grid.times, grid.sizes, grid.output_index)
    if result is None:
        return None
    ys, states = result
    check_finite_outputs(ys, problem.times_out, problem.field)
    nfe = (tableau.stages - 1) * grid.steps + 1 if tableau.fsal else tableau.stages * grid.steps
    problem.path = path
    problem.stats = SolveStats(nfe_forward=nfe if grid.steps else 0, accepted_steps=grid.steps)
    problem.grid = grid
    return ys, states


def _backward_compiled(problem: _Problem, states: Tensor, grad_ys: Tensor) -> list[Tensor | None] | None:
    """The discrete adjoint as one compiled reverse scan; ``None`` if it fell back to eager."""
    assert problem.programs is not None and problem.grid is not None and problem.stats is not None
    grid, tableau, field = problem.grid, problem.tableau, problem.field
    params = tuple(problem.params)
    names = functional_names(problem.programs, field, params)
    if names is None:
        return None
    needed = _stages_needed(tableau)
    last = max(i for i, n in enumerate(needed) if n)

    def build() -> Callable[..., Any]:
        def program(field, states, grad_rows, times, sizes, slots, *params):
            call = functional_field(field, names)
            def stage_vjp(t: Tensor, x: Tensor, kbar: Tensor):
                _, xbar, pbars = func_vjp(lambda x, p: call(p, t, x), x, params, kbar)
                return xbar, pbars

            def evaluate(t: Tensor, x: Tensor) -> Tensor:
                return call(params, t, x)

            # the first stage's time as the forward evaluated it (FSAL: t_{n-1} + h_{n-1})
            firsts = torch.cat([times[:1], times[:-1] + sizes[:-1]]) if tableau.fsal else times

            def body(carry, x):
                ybar, pbars = carry
                y, t, h, t_first, slot = x
                ybar, step_pbars = _reverse_step(tableau, evaluate, stage_vjp, y, h,
                                                 _stage_times(tableau, t, h, t_first), ybar)
                pbars = tuple(p if q is None else p + q for p, q in zip(pbars, step_pbars))
                return (ybar + row(grad_rows, slot), pbars), h.new_zeros(())

            init = (row(grad_rows, slots[-1]), tuple(torch.zeros_like(p) for p in params))
            (ybar, pbars), _ = scan(body, _fresh(init), (states, times, sizes, firsts, slots[:-1]), reverse=True)
            return ybar, pbars

        return program

    grad_rows = torch.cat([grad_ys, grad_ys.new_zeros((1, *grad_ys.shape[1:]))])  # row len(ts): no output
    key = problem.programs.key("symplectic/backward", field, [states, grad_rows, *params], (tableau.name, grid.layout))
    result = problem.programs.run(key, build, field, states, grad_rows, grid.times, grid.sizes, grid.slots, *params)
    if result is None:
        return None
    ybar, pbars = result
    problem.stats.nfe_backward += grid.steps * (last + sum(needed))
    return [ybar, *pbars]


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

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        times = check_inputs(y0, ts)
        self.stepping.check(self.tableau)
        params = inspect_field(field, ts[0], y0, self.name, params=params)
        problem = _Problem(
            field=field, params=params, tableau=self.tableau, stepping=self.stepping,
            times_out=times, time_dtype=ts.dtype, time_device=ts.device, strategy=self.name,
            programs=self.programs if self._compiles() else None,
            step_factory=self._compiled_rk_step(field),
        )
        with SavedBytes() as saved:
            ys = _SymplecticAdjoint.apply(problem, y0, *params)
        assert problem.path is not None and problem.stats is not None
        return self._record(Solution(ys, ts, problem.stats, problem.path, saved_bytes=saved.nbytes))
