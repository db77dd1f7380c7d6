"""Checkpointing: exact gradients with a few stored states and one step's graph at a time.

Fixed steps use a binomial schedule (Griewank & Walther, "Algorithm 799: Revolve", 2000):
with ``c`` snapshots, ``N`` steps are reversed with each step recomputed at most ``r``
times, where ``r`` is the smallest integer with ``C(c + r, c) >= N``; recomputation grows as
``c`` shrinks. Adaptive steps use per-step checkpointing (ACA; Zhuang et al., "Adaptive
Checkpoint Adjoint", ICML 2020): the state at every accepted step start is kept, and each
step is recomputed once with a graph.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from math import comb
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
    odeint,
    rk_step,
    rk_stepper,
)
from nde_zoo.solvers.stepping import DEFAULT_MAX_STEPS
from nde_zoo.strategies._autograd import _detached, _identity, check_no_hidden_inputs
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

__all__ = ["Checkpoint", "binomial_split", "binomial_repetitions", "binomial_recomputations", "binomial_peak_states"]


def binomial_repetitions(steps: int, snapshots: int) -> int:
    """The smallest ``r`` with ``beta(c, r) = C(c + r, c) >= steps`` for ``c = snapshots``.

    With ``c`` stored states (the start of the span included), ``beta(c, r)`` steps can be
    reversed with no step advanced more than ``r`` times (Griewank & Walther).
    """
    r = 0
    while comb(snapshots + r, snapshots) < steps:
        r += 1
    return r


def binomial_split(steps: int, free: int) -> int:
    """Where to store the next state in a span of ``steps`` with ``free`` snapshots left.

    The span's start is stored, so ``c = free + 1``. The left part is reversed later with
    one repetition fewer, the right part with one snapshot fewer:
    ``beta(c, r) = beta(c, r - 1) + beta(c - 1, r)``, so the split is ``beta(c, r - 1)``.
    """
    c = free + 1
    r = binomial_repetitions(steps, c)
    return max(1, min(comb(c + r - 1, c), steps - 1))


def binomial_recomputations(steps: int, snapshots: int | None) -> int:
    """Steps advanced without a graph during the backward pass of an eager fixed-step solve of
    ``steps`` steps with ``snapshots`` stored states (``None``: every step start, no recomputation).

    Counts what :class:`_Reverser` does (``SolveStats.recomputed_steps`` after backward; a test
    checks they agree) without running anything: :class:`~nde_zoo.strategies.Auto` uses it to
    predict the time of a schedule it has not run.
    """
    return _binomial_walk(steps, snapshots)[0]


def binomial_peak_states(steps: int, snapshots: int | None) -> int:
    """The most states an eager fixed-step solve keeps alive at once for its backward pass: the
    ones its forward pass stored plus the recomputed ones the reversal holds while it recurses
    (``SolveStats.held_bytes``; a test checks they agree). ``None``: every step start."""
    return _binomial_walk(steps, snapshots)[1]


@functools.lru_cache(maxsize=1024)
def _binomial_walk(steps: int, snapshots: int | None) -> tuple[int, int]:
    """``(recomputed steps, peak states alive)`` of :class:`_Reverser`'s walk, simulated."""
    if snapshots is None or steps <= 1:
        return 0, steps
    stored = {0, *_spine(steps, snapshots)}

    recomputed, peak = 0, 0
    spans = [(0, steps, snapshots - 1, 0)]  # (a, b, free, states held): as _Reverser.revolve walks
    while spans:
        a, b, free, held = spans.pop()
        if b - a == 1:
            peak = max(peak, held)
        elif free == 0:  # each step of the span replayed from its start, one state at a time
            replayed = [k - a for k in range(a + 1, b) if k not in stored]
            recomputed += sum(replayed)
            peak = max(peak, held + (1 if replayed else 0))
        else:
            m = a + binomial_split(b - a, free)
            new = 0 if m in stored else 1
            recomputed += new * (m - a)
            peak = max(peak, held + new)
            spans += [(a, m, free, held), (m, b, free - 1, held + new)]
    return recomputed, len(stored) + peak


@dataclass
class _Problem:
    field: Any
    params: list[Tensor]
    tableau: ButcherTableau
    stepping: Stepping
    snapshots: int | None
    times_out: list[float]
    strategy: str
    programs: Programs | None = None  # set when compile= asks for compiled fixed-step loops
    path: Path | None = None
    stats: SolveStats = dataclass_field(default_factory=SolveStats)
    stored_positions: list[int] = dataclass_field(default_factory=list)
    segment: int = 0  # compiled: steps between snapshots (the two-level schedule)
    step_factory: Any = None  # adaptive with compile=: the compiled step (odeint's step_factory)


def _spine(steps: int, snapshots: int) -> list[int]:
    """Positions the first descent of the schedule needs: stored during the forward sweep."""
    positions, a, free = [], 0, snapshots - 1
    while steps - a > 1 and free > 0:
        a += binomial_split(steps - a, free)
        positions.append(a)
        free -= 1
    return positions


def _forward(problem: _Problem, y0: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Plain RK without a graph (the steps :class:`Direct` takes); keeps the states to store."""
    if problem.programs is not None:
        compiled = _forward_compiled(problem, y0)
        if compiled is not None:
            return compiled
    ts = torch.tensor(problem.times_out, dtype=y0.dtype, device=y0.device)
    ys, path, stats = odeint(problem.field, y0, ts, problem.tableau, problem.stepping, record_states=True,
                             step_factory=problem.step_factory)
    if problem.snapshots is None:
        positions = list(range(path.steps))
    else:
        positions = [0, *_spine(path.steps, problem.snapshots)]
    # copies: the views would keep the whole N-state buffer of the forward alive
    stored = [path.states[k].clone() for k in positions] if problem.snapshots is not None else path.states
    path.states, path.final_state = [], None
    problem.path, problem.stats, problem.stored_positions = path, stats, positions
    return ys, stored


class _CheckpointAdjoint(torch.autograd.Function):
    """``ys = solve(y0; params)``; the parameters are explicit inputs (so DDP's reducer hooks fire)."""

    @staticmethod
    def forward(ctx: Any, problem: _Problem, y0: Tensor, *params: Tensor) -> Tensor:
        with torch.autograd.graph.saved_tensors_hooks(_detached, _identity):
            ys, stored = _forward(problem, y0)
        ctx.problem = problem
        ctx.save_for_backward(*stored)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        stored = list(ctx.saved_tensors)
        if problem.segment:
            grads = _backward_compiled(problem, stored[0], grad_ys)
            if grads is not None:
                return (None, *grads)
            # the compiled backward fell back: replay the stored segment starts eagerly
            problem.stored_positions = [k * problem.segment for k in range(stored[0].shape[0])]
            problem.snapshots, stored = len(problem.stored_positions), list(stored[0].unbind(0))
            problem.snapshots = None if problem.segment == 1 else problem.snapshots
        return (None, *_Reverser(problem, stored, grad_ys).run())


def _forward_compiled(problem: _Problem, y0: Tensor) -> tuple[Tensor, list[Tensor]] | None:
    """The forward solve as one compiled scan; stores every ``segment``-th step start.

    The compiled schedule is two-level and uniform (the binomial schedule's recursion does not
    fit one program): ``S <= snapshots`` states ``segment = ceil(N / snapshots)`` steps apart are
    kept; backward recomputes each segment's step starts once (``segment`` states) and pulls the
    cotangent back through its steps. Memory: ``S + segment`` states and one step's graph.
    """
    assert problem.programs is not None
    path = fixed_path(problem.times_out, problem.stepping)
    grid = Grid.of(path.times, path.sizes, path.output_steps, y0)
    steps = grid.steps
    if steps == 0:
        return None
    snapshots = steps if problem.snapshots is None else min(problem.snapshots, steps)
    segment = -(-steps // snapshots)
    field, tableau, layout = problem.field, problem.tableau, grid.layout

    def build() -> Callable[..., Any]:
        def program(field: Any, y0: Tensor, times: Tensor, sizes: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
            step = rk_stepper(field, tableau)  # the eager loop's step
            k1 = field(times[0], y0) if tableau.fsal else None  # the first step's stage, as rk_step takes it
            ys, _, states = scan_forward(step, y0, k1, lambda y: y, times, sizes, layout, index, every_state=True)
            return ys, states[::segment].clone()  # clone: the other step starts are freed

        return program

    key = problem.programs.key("checkpoint/forward", field, [y0], (tableau.name, layout, segment))
    if problem.programs.first_call(key):
        CountedField(field)(y0.new_tensor(problem.times_out[0]), y0)  # shape check, as the eager loop's
    result = problem.programs.run(key, build, field, y0, grid.times, grid.sizes, grid.output_index)
    if result is None:
        return None
    ys, stored = result
    check_finite_outputs(ys, problem.times_out, problem.field)
    nfe = (tableau.stages - 1) * steps + 1 if tableau.fsal else tableau.stages * steps
    problem.path, problem.segment = path, segment
    problem.stats = SolveStats(nfe_forward=nfe, accepted_steps=steps)
    return ys, [stored]


def _backward_compiled(problem: _Problem, stored: Tensor, grad_ys: Tensor) -> list[Tensor | None] | None:
    """Reverse the segments in one compiled program; ``None`` if it fell back to eager."""
    assert problem.programs is not None and problem.path is not None
    path, tableau, field, segment = problem.path, problem.tableau, problem.field, problem.segment
    params = tuple(problem.params)
    names = functional_names(problem.programs, field, params)
    if names is None:
        return None
    segments = stored.shape[0]
    padding = segments * segment - path.steps  # identity steps (h = 0) after the end
    end = path.times[-1]
    grid = Grid.of([*path.times, *[end] * padding], [*path.sizes, *[0.0] * padding], path.output_steps, stored)

    def build() -> Callable[..., Any]:
        def program(field, stored, grad_rows, times, sizes, slots, *params):
            call = functional_field(field, names)
            def advance(y: Tensor, x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
                y_next = rk_step(lambda t, v: call(params, t, v), x[0], y, x[1], tableau).y
                return y_next, y_next.clone()

            def reverse(carry, x):
                ybar, pbars = carry
                y, t, h, slot = x
                step = lambda y, p: rk_step(lambda tt, v: call(p, tt, v), t, y, h, tableau).y  # noqa: E731
                _, ybar, step_pbars = func_vjp(step, y, params, ybar)
                pbars = tuple(p + q for p, q in zip(pbars, step_pbars))
                return (ybar + row(grad_rows, slot), pbars), h.new_zeros(())

            def segment_body(carry, x):
                start, seg_times, seg_sizes, seg_slots = x
                if segment > 1:  # recompute the segment's step starts, without a graph
                    _, later = scan(advance, start.clone(), (seg_times[:-1], seg_sizes[:-1]))
                    starts = torch.cat([start.unsqueeze(0), later])
                else:
                    starts = start.unsqueeze(0)
                carry, _ = scan(reverse, carry, (starts, seg_times, seg_sizes, seg_slots), reverse=True)
                return carry, seg_sizes.new_zeros(())

            shape = (stored.shape[0], segment)
            xs = (stored, times.reshape(shape), sizes.reshape(shape), slots[:-1].reshape(shape))
            init = (row(grad_rows, slots[-1]), tuple(torch.zeros_like(p) for p in params))
            (ybar, pbars), _ = scan(segment_body, _fresh(init), xs, reverse=True)
            return ybar, pbars

        return program

    # padded steps are no output (their slots point at the zero row); the last output's cotangent
    # enters after the first padded step is reversed, which is the identity
    slots = grid.slots
    grad_rows = torch.cat([grad_ys, grad_ys.new_zeros((1, *grad_ys.shape[1:]))])
    key = problem.programs.key("checkpoint/backward", field, [stored, grad_rows, *params],
                               (tableau.name, grid.layout, segment))
    result = problem.programs.run(key, build, field, stored, grad_rows, grid.times, grid.sizes, slots, *params)
    if result is None:
        return None
    ybar, pbars = result
    total = segments * segment
    problem.stats.recomputed_steps += total - segments
    if segment > 1:  # the program recomputes a segment's step starts and holds them at once
        state_bytes = stored[0].nelement() * stored.element_size()
        problem.stats.held_bytes = max(problem.stats.held_bytes, segment * state_bytes)
    problem.stats.nfe_backward += tableau.stages * (2 * total - segments)
    return [ybar, *pbars]


class _Reverser:
    """Walks the steps backwards in order, taking states from snapshots or recomputation."""

    def __init__(self, problem: _Problem, stored: list[Tensor], grad_ys: Tensor) -> None:
        self.p = problem
        assert problem.path is not None
        self.path = problem.path
        self.stored = dict(zip(problem.stored_positions, stored))
        self.grad_ys = grad_ys
        self.counted = CountedField(problem.field)
        self.output_at: dict[int, list[int]] = {}
        for j, n in enumerate(self.path.output_steps):
            self.output_at.setdefault(n, []).append(j)
        self.param_grads: list[Tensor | None] = [None] * len(problem.params)
        self.checked = False
        self.ybar = torch.zeros_like(grad_ys[0])
        self._held = 0  # bytes of recomputed snapshots alive (SolveStats.held_bytes: their peak)
        self._add_outputs(self.path.steps)

    def _add_outputs(self, position: int) -> None:
        for j in self.output_at.get(position, []):
            self.ybar = self.ybar + self.grad_ys[j]

    def _time(self, n: int) -> Tensor:
        return self.grad_ys.new_tensor(self.path.times[n])

    def advance(self, state: Tensor, a: int, b: int) -> Tensor:
        """The state at step ``b`` from the one at ``a``, without a graph."""
        if b in self.stored and b != a:
            return self.stored[b]
        with torch.no_grad():
            for n in range(a, b):
                state = rk_step(self.counted, self._time(n), state, self.path.sizes[n], self.p.tableau).y
        self.p.stats.recomputed_steps += b - a
        if b != a:  # a snapshot the recursion holds until it returns: count it while it lives
            self._held += state.untyped_storage().nbytes()
            self.p.stats.held_bytes = max(self.p.stats.held_bytes, self._held)
            weakref.finalize(state, self._release, state.untyped_storage().nbytes())
        return state

    def _release(self, nbytes: int) -> None:
        self._held -= nbytes

    def reverse_step(self, n: int, state: Tensor) -> None:
        """Recompute step ``n`` with a graph and pull the cotangent back through it."""
        leaf = state.detach().requires_grad_()
        with torch.enable_grad():
            y_next = rk_step(self.counted, self._time(n), leaf, self.path.sizes[n], self.p.tableau).y
        if not self.checked:
            check_no_hidden_inputs(y_next, [leaf, *self.p.params], self.p.strategy)
            self.checked = True
        grads = torch.autograd.grad(y_next, [leaf, *self.p.params], self.ybar, allow_unused=True)
        self.ybar = grads[0] if grads[0] is not None else torch.zeros_like(self.ybar)
        for i, g in enumerate(grads[1:]):
            if g is not None:
                self.param_grads[i] = g if self.param_grads[i] is None else self.param_grads[i] + g
        self._add_outputs(n)

    def revolve(self, a: int, b: int, state: Tensor, free: int) -> None:
        """Reverse steps ``[a, b)`` from ``state`` (at ``a``) with ``free`` snapshots to spare.

        Depth first, right span before left, with an explicit stack (the recursion's depth grows
        with the snapshots: a thousand overflowed Python's stack). A pending span holds its start
        state exactly as long as the recursive call's frame would.
        """
        spans = [(a, b, state, free)]
        while spans:
            a, b, state, free = spans.pop()
            if b - a == 1:
                self.reverse_step(a, state)
            elif free == 0:
                for k in reversed(range(a, b)):
                    self.reverse_step(k, self.advance(state, a, k))
            else:
                m = a + binomial_split(b - a, free)
                spans.append((a, m, state, free))
                spans.append((m, b, self.advance(state, a, m), free - 1))
            del state  # the pending spans hold what is still needed

    def run(self) -> list[Tensor | None]:
        steps = self.path.steps
        if self.p.snapshots is None:  # every step start stored (ACA)
            for n in reversed(range(steps)):
                self.reverse_step(n, self.stored[n])
        elif steps > 0:
            self.revolve(0, steps, self.stored[0], self.p.snapshots - 1)
        self.p.stats.nfe_backward += self.counted.nfe
        return [self.ybar, *self.param_grads]


class Checkpoint(ODEStrategy):
    """Backprop one step at a time from stored states: exact, with memory you choose.

    Gradient: exact for the discretisation (equal to :class:`Direct` up to round-off).
    Memory: the states the forward pass stores (at most ``snapshots``) plus the recomputed ones
    the reversal holds at once, up to about ``2 * snapshots`` in all (the stored ones live until
    backward ends; :func:`binomial_peak_states` counts them, ``solution.stats.held_bytes`` measures
    the held ones), plus one step's graph (``s`` stages); time: the
    forward solve, the recomputation the binomial schedule needs (grows as ``snapshots``
    shrinks; ``solution.stats.recomputed_steps`` tells after backward), and ``N`` steps with a
    graph.

    Args:
        solver, steps / step_size, rtol / atol / max_steps: as :class:`ODEStrategy`.
        snapshots: stored states (the initial one included) for the binomial schedule of
            a fixed-step solve; ``None`` keeps every step start (no recomputation), which
            is also what adaptive solves do (ACA), where ``snapshots`` must be ``None``.
    """

    name = "checkpoint"
    compilable = True

    def __init__(
        self,
        solver: str | ButcherTableau = "dopri5",
        *,
        steps: int | None = None,
        step_size: float | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        snapshots: int | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__(solver, steps=steps, step_size=step_size, rtol=rtol, atol=atol, max_steps=max_steps,
                         compile=compile)
        if snapshots is not None:
            if self.stepping.adaptive:
                raise ValueError(
                    "snapshots= sets a binomial schedule for fixed steps; adaptive solves checkpoint every "
                    "accepted step (ACA): leave snapshots=None, or give steps=/step_size="
                )
            if int(snapshots) != snapshots or snapshots < 1:
                raise ValueError(f"snapshots must be a positive integer (y0 counts as one), got {snapshots!r}")
        self.snapshots = None if snapshots is None else int(snapshots)

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        times = check_inputs(y0, ts)
        params = inspect_field(field, ts[0], y0, self.name, params=params)
        problem = _Problem(field, params, self.tableau, self.stepping, self.snapshots, times, self.name,
                           programs=self.programs if self._compiles() else None,
                           step_factory=self._compiled_rk_step(field))
        with SavedBytes() as saved:
            ys = _CheckpointAdjoint.apply(problem, y0, *params)
        return self._record(Solution(ys, ts, problem.stats, problem.path, saved_bytes=saved.nbytes))

    def __repr__(self) -> str:
        extra = f", compile={self.compile}" if self.compile.enabled else ""
        return f"Checkpoint(solver={self.tableau.name!r}, {self.stepping.describe()}, snapshots={self.snapshots}{extra})"
