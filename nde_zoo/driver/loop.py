"""The one solve loop every RK-based strategy runs: forward, backward, eager or compiled.

A strategy declares a :class:`Scheme`, three things (diffrax's split between a solver and an
``AbstractAdjoint``, in PyTorch):

- its **forward step** (``Scheme.step``: the plain RK step, or the reversible coupled step);
- **what it keeps** for backward (``Scheme.keeps``): the whole graph (``"graph"``, plain autograd:
  :class:`~nde_zoo.strategies.Direct`), every step start (``"every"``), only the final state
  (``"ends"``: the backward pass rebuilds the states), or a checkpointing :class:`Schedule`;
- its **reverse step** (``Scheme.reverse``): from the state at a step's start (or its end, for
  ``"ends"``) and the cotangent after it, the cotangent before it and the parameters' share. It
  takes its vector-Jacobian products from ``ops.vjp``: autograd's eagerly, ``torch.func.vjp``
  compiled, so the same function runs in both.

:func:`solve` runs the scheme: the inputs and the field are checked once, the forward pass is the
stepping loop of :mod:`nde_zoo.solvers` (fixed or adaptive) or one compiled scan, the backward pass
a Python loop or one compiled reverse scan; the NFE, the output positions, the finite checks and
the fall-back to eager live here and nowhere else. The forward pass *returns* what the backward
pass needs (a :class:`Forward`), which the autograd Function keeps.

Why scans: a compiled solve is one program over the whole grid (``torch._higher_order_ops.scan``,
:mod:`nde_zoo._torch_compat`), so Inductor sees the loop once instead of ``N`` copies of the step
(docs/compile.md); the step inside the scan body is the eager loop's own function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
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
    fixed_path,
    hairer_first_step,
    integrate,
    rk_stepper,
)
from nde_zoo.driver.autograd import _detached, _identity, check_no_hidden_inputs
from nde_zoo.driver.programs import (
    Programs,
    adaptive_step,
    func_vjp,
    functional_field,
    functional_names,
    requiring_grad,
    scan,
)
from nde_zoo.driver.schedule import HeldStates, Schedule

__all__ = ["Scheme", "Forward", "Grid", "Run", "add_grads", "solve", "scan_forward", "row"]

Bar = Any  # a state's cotangent: a tensor, or a tuple of them for a tuple state


class Scheme:
    """A strategy's method as the driver runs it. The defaults are the plain RK method.

    Attributes:
        tableau: the RK method. keeps: ``"graph"``, ``"every"``, ``"ends"`` or ``"schedule"``.
    """

    keeps = "graph"

    def __init__(self, tableau: ButcherTableau) -> None:
        self.tableau = tableau

    # -- forward ----------------------------------------------------------------------------
    def step(self, field: Any) -> Callable[..., Any]:
        """``step(t, state, h, carry) -> (state, error, carry)`` (:func:`nde_zoo.solvers.integrate`)."""
        return rk_stepper(field, self.tableau)

    def init(self, y0: Tensor) -> Any:
        """The state at ``ts[0]``."""
        return y0

    def observe(self, state: Any) -> Tensor:
        """The solution tensor of a state, ``(batch, *state)``."""
        return state

    def first_carry(self, field: Any, t0: Tensor, state0: Any) -> Any:
        """The first step's reusable carry in a compiled scan (the FSAL stage)."""
        return field(t0, state0) if self.tableau.fsal else None

    def step_evaluations(self, carry: Any) -> int:
        """Field evaluations of one step given its incoming carry."""
        return self.tableau.stages - (1 if carry is not None else 0)

    def forward_nfe(self, steps: int) -> int:
        """Field evaluations of a fixed-step forward solve (the compiled programs cannot count)."""
        s = self.tableau.stages
        return 0 if steps == 0 else ((s - 1) * steps + 1 if self.tableau.fsal else s * steps)

    def key(self) -> tuple[Any, ...]:
        """What a compiled program of this scheme bakes in besides the grid."""
        return (self.tableau.name,)

    # -- backward ---------------------------------------------------------------------------
    def reverse(self, ops: Any, t: Tensor, h: Any, t_first: Tensor, state: Any, bar: Bar) -> tuple[Any, Bar, Sequence[Tensor | None]]:
        """Pull ``bar`` (after step ``n``) back through step ``n``: ``(state before or None, bar, pbars)``.

        ``state`` is the step's start (``keeps`` ``"every"`` / ``"schedule"``) or its end (``"ends"``).
        ``t_first`` is the time the forward pass evaluated the first stage at (FSAL: ``t_{n-1} + h_{n-1}``).
        """
        raise NotImplementedError

    def backward_nfe(self, steps: int) -> int:
        """Field evaluations of a compiled backward pass over ``steps`` steps (recomputation apart)."""
        return self.tableau.stages * steps

    def zero_bar(self, like: Tensor) -> Bar:
        return torch.zeros_like(like)

    def add_output(self, bar: Bar, cotangent: Tensor) -> Bar:
        """Add an output's cotangent to the observed part of ``bar``."""
        return bar + cotangent

    def y0_bar(self, bar: Bar) -> Tensor:
        return bar

    def pack(self, state: Any) -> tuple[Tensor, ...]:
        return (state,)

    def unpack(self, tensors: Sequence[Tensor]) -> Any:
        return tensors[0]

    def after_forward(self, y0: Tensor, state: Any, path: Path, extras: dict[str, Any]) -> None:
        """A check on the forward pass's final state (Reversible: the coupled drift)."""

    def after_backward(self, y0: Tensor, state: Any, extras: dict[str, Any]) -> None:
        """A check on the rebuilt initial state (Reversible: the reconstruction error)."""


@dataclass(frozen=True)
class Forward:
    """What a forward pass returns for its backward pass (the autograd Function keeps it, less
    ``ys``: a Function holding its own output would keep its graph alive in a reference cycle).

    ``saved`` are the tensors kept: the stored step starts (one stacked ``(S, batch, ...)``
    tensor when ``stacked``) or, for ``"ends"``, the final state's tensors and ``y0``.
    """

    ys: Tensor | None
    path: Path
    stats: SolveStats
    saved: tuple[Tensor, ...]
    stacked: bool = False
    schedule: Schedule | None = None
    grid: Grid | None = None  # set when the forward ran compiled: its backward may too
    rows: int | None = None  # the batch's rows when it ran padded to a compiled program's batch


@dataclass
class Run:
    """One solve's constants: what forward and backward read, never what they compute."""

    scheme: Scheme
    field: Any
    params: list[Tensor]
    stepping: Stepping
    times: list[float]
    t_like: Tensor
    strategy: str
    programs: Programs | None  # compiled fixed-step loops (``compile=`` and fixed steps)
    adaptive_programs: Programs | None  # compiled adaptive steps
    snapshots: int | None = None
    schedule_kind: str = "uniform"
    autocast_off: bool = False
    extras: dict[str, Any] = dataclass_field(default_factory=dict)


def solve(run: Run, y0: Tensor) -> tuple[Tensor, SolveStats, Path]:
    """Solve with ``run.scheme``; differentiable with respect to ``y0`` and ``run.params``."""
    if run.stepping.adaptive:  # a NaN y0 would otherwise surface as a step-size underflow
        check_finite_outputs(y0.unsqueeze(0), run.times[:1])
    if run.scheme.keeps == "graph":
        forward = _forward(run, y0)
        return forward.ys, forward.stats, forward.path
    box: list[Forward] = []
    ys = _Solve.apply(run, box, y0, *run.params)
    return ys, box[0].stats, box[0].path


class _Solve(torch.autograd.Function):
    """``ys = solve(y0; params)``; the parameters are explicit inputs (so DDP's reducer hooks fire)."""

    @staticmethod
    def forward(ctx: Any, run: Run, box: list[Forward], y0: Tensor, *params: Tensor) -> Tensor:
        # The identity hooks shadow an outer SavedBytes while the field runs (a CNF field builds and
        # frees a graph of its own), so what is counted is exactly what is kept below.
        with _autocast_off(run, y0), torch.autograd.graph.saved_tensors_hooks(_detached, _identity):
            forward = _forward(run, y0)
        ys, saved = forward.ys, forward.saved
        forward = dataclasses.replace(forward, ys=None, saved=())  # the tensors go through save_for_backward
        box.append(forward)
        ctx.run, ctx.forward = run, forward
        ctx.save_for_backward(*saved)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[Tensor | None, ...]:
        run, forward = ctx.run, ctx.forward
        saved = ctx.saved_tensors
        if forward.rows is not None:  # the padding rows' outputs are not the solve's: zero cotangents
            full = saved[0].shape[1 if forward.stacked else 0]
            grad_ys = torch.cat([grad_ys, grad_ys.new_zeros((grad_ys.shape[0], full - forward.rows,
                                                             *grad_ys.shape[2:]))], dim=1)
        with _autocast_off(run, grad_ys):
            grads = _backward_compiled(run, forward, saved, grad_ys) if forward.grid is not None else None
            if grads is None:
                grads = _backward_eager(run, forward, saved, grad_ys)
        if forward.rows is not None:
            grads[0] = grads[0][: forward.rows]
        return (None, None, *grads)


def _autocast_off(run: Run, like: Tensor) -> Any:
    """Autocast off for a scheme that needs full precision (Reversible's algebraic rebuild)."""
    return torch.autocast(like.device.type, enabled=False) if run.autocast_off else contextlib.nullcontext()


# -- forward -----------------------------------------------------------------------------------
def _forward(run: Run, y0: Tensor) -> Forward:
    scheme = run.scheme
    schedule = None
    # compiled: the grid as tensors (cached); eager: the stepping loop builds its own path
    fixed = fixed_path_and_grid(run.times, run.stepping, y0) if run.programs is not None else None
    if scheme.keeps == "schedule" and not run.stepping.adaptive:
        steps = fixed[0].steps if fixed is not None else fixed_path(run.times, run.stepping).steps
        schedule = Schedule(steps, run.snapshots, run.schedule_kind)
    step_programs, kind = run.adaptive_programs, f"{run.strategy}/adaptive_step"
    if fixed is not None:
        if scheme.keeps == "graph" and y0.numel() >= STEP_PROGRAMS_FROM and y0.device.type == "cpu":
            step_programs, kind = run.programs, f"{run.strategy}/step"  # each step compiled, autograd between
        else:
            compiled = _forward_compiled(run, y0, schedule, fixed)
            if compiled is not None:
                return compiled
    counted = CountedField(run.field)
    step = scheme.step(counted)
    if step_programs is not None:  # adaptive, or Direct on a large state: the same step, compiled
        step = adaptive_step(step_programs, kind, run.field, scheme.step, counted, scheme.step_evaluations,
                             scheme.key(), example=(run.t_like, y0.detach()), differentiated=scheme.keeps == "graph")
    record: bool | Sequence[int] = scheme.keeps in ("every", "schedule")
    if schedule is not None and not schedule.every:
        record = schedule.stored
    outputs, path, stats = integrate(
        step, scheme.init(y0), scheme.observe, run.times, run.t_like, run.stepping, scheme.tableau.order,
        first_step=hairer_first_step(counted, run.t_like, y0, scheme.tableau, run.stepping), record_states=record,
    )
    ys = torch.stack(outputs)  # (len(ts), batch, *state)
    check_finite_outputs(ys, run.times, run.field)
    stats.nfe_forward = counted.nfe
    final, states = path.final_state, path.states
    path.final_state, path.states = None, []
    if scheme.keeps == "ends":
        scheme.after_forward(y0, final, path, run.extras)
        saved = (*scheme.pack(final), y0)
    else:
        saved = tuple(states) if scheme.keeps != "graph" else ()
    if schedule is None and scheme.keeps == "schedule":  # adaptive: every accepted step start (ACA)
        schedule = Schedule(path.steps, None)
    return Forward(ys, path, stats, saved, schedule=schedule)


def _forward_compiled(run: Run, y0: Tensor, schedule: Schedule | None, fixed: tuple[Path, Grid]) -> Forward | None:
    """The forward loop as one compiled scan over ``fixed`` (:func:`fixed_path_and_grid`); ``None``
    when it runs eagerly instead."""
    scheme, programs = run.scheme, run.programs
    assert programs is not None
    path, grid = fixed
    path = Path(times=array("d", path.times), output_steps=list(path.output_steps), sizes=array("d", path.sizes))
    if grid.steps == 0:
        return None
    keeps, layout = scheme.keeps, grid.layout
    if keeps != "graph":
        # Grad is off here (inside the autograd Function, or in validation): without its flag the
        # state is the same program input for both, so the sanity check's program trains too.
        y0 = y0.detach()
    positions = None if schedule is None or schedule.every else schedule.stored
    uniform = schedule is not None and schedule.kind == "uniform"

    def build() -> Callable[..., Any]:
        def program(field: Any, y0: Tensor, times: Tensor, sizes: Tensor, index: Tensor) -> Any:
            state0 = scheme.init(y0)
            carry = scheme.first_carry(field, times[0], state0)
            ys, final, states = scan_forward(scheme.step(field), state0, carry, scheme.observe, times, sizes,
                                             layout, index, every_state=keeps in ("every", "schedule"),
                                             nested=keeps != "graph")
            if keeps == "ends":
                return ys, scheme.pack(final)
            if keeps == "graph":
                return ys, ()
            if positions is None:
                return ys, (states,)
            if uniform:
                return ys, (states[:: schedule.segment].clone(),)  # clone: the other step starts are freed
            return ys, (states.index_select(0, torch.tensor(positions, device=states.device)),)

        return program

    graded = contextlib.nullcontext()
    if keeps == "graph":
        # One program, with its graph, for training and for passes without gradients (validation, and
        # Lightning's sanity check before any training), whichever comes first: a pass without gradients
        # runs it and drops the graph. y0 always requires grad (a leaf where it does not: the data; kept
        # with its graph where it does: an encoder's output), so both passes have the same inputs.
        if not torch.is_grad_enabled():
            graded = torch.enable_grad()
        y0 = requiring_grad(y0)
    extra = (*scheme.key(), layout, keeps, schedule, keeps == "graph" or torch.is_grad_enabled())
    kind = run.strategy if keeps == "graph" else f"{run.strategy}/forward"  # graph: one program, forward and backward
    key = programs.key(kind, run.field, [y0], extra)
    rows = None
    with graded:
        if programs.first_call(key):
            CountedField(run.field)(run.t_like, y0)  # the shape check of the eager loop's first call
            full = programs.padded_batch(key)
            if full is not None and _rows_independent(run, y0, full):  # a ragged batch: the full batch's program
                rows, y0 = y0.shape[0], _pad_rows(y0, full)
                key = programs.key(kind, run.field, [y0], extra)
        result = programs.run(key, build, run.field, y0, grid.times, grid.sizes, grid.output_index,
                              example=(run.t_like, y0.detach()))
    if result is None:
        return None
    ys, kept = result
    if rows is not None:
        ys = ys[:, :rows]
    if not torch.is_grad_enabled():
        ys = ys.detach()
    check_finite_outputs(ys, run.times, run.field)
    stats = SolveStats(nfe_forward=scheme.forward_nfe(grid.steps), accepted_steps=grid.steps)
    if keeps == "ends":
        final = scheme.unpack(kept)
        scheme.after_forward(y0, final, path, run.extras)
        kept = (*kept, y0)
    return Forward(ys, path, stats, tuple(kept), stacked=keeps in ("every", "schedule"), schedule=schedule,
                   grid=grid, rows=rows)


#: Direct (autograd through the loop) compiles each step, not the whole loop, from this many state elements
#: (``y0.numel()``). Autograd through a compiled scan stacks every step's residuals in copies of its own,
#: which costs more than the fusion saves once the state is large: on a 64 -> 128 -> 64 tanh MLP,
#: midpoint, N = 100, one thread, the scan ran at 1.35x eager's speed with a batch of 64 (4,096 elements),
#: 0.79x at 512 and 0.80x at 2048 (131,072); each step compiled: 1.21x, 0.98x, 1.02x (docs/compile.md).
#: Measured on the CPU only: on a GPU the scan stays (unmeasured there, and CUDA graphs favour one program).
STEP_PROGRAMS_FROM = 1 << 14

#: grids longer than this are built per solve, not cached: 16 cached grids cost 40 bytes a step each
CACHED_GRID_STEPS = 1 << 17


def fixed_path_and_grid(times: Sequence[float], stepping: Stepping, like: Tensor) -> tuple[Path, Grid]:
    """The fixed path of a solve and its tensors (``like``'s dtype and device); the path is shared: copy it.

    A training loop solves on the same grid every step; building it in Python (a loop over the
    steps) and copying it to tensors was a tenth of a compiled white-dwarf step (N = 1000), so
    grids up to :data:`CACHED_GRID_STEPS` steps are built once per (output times, stepping, dtype,
    device) and kept, 16 at most: a solve whose output times move every call (ERNODE's sampled
    time) keeps nothing growing.
    """
    # at most this many steps: the uniform ones, plus one for each output time landed on between them
    if stepping.steps is not None:
        uniform = int(stepping.steps)
    else:
        uniform = math.ceil(abs(times[-1] - times[0]) / max(abs(float(stepping.step_size or 1.0)), 1e-300))
    if uniform + len(times) > CACHED_GRID_STEPS:
        return _build_grid(tuple(times), stepping, like.dtype, like.device)
    return _cached_grid(tuple(times), stepping, like.dtype, like.device)


def _build_grid(times: tuple[float, ...], stepping: Stepping, dtype: torch.dtype,
                device: torch.device) -> tuple[Path, Grid]:
    path = fixed_path(list(times), stepping)
    with torch.inference_mode(False):  # a grid first built in validation (inference mode) also trains
        like = torch.empty(0, dtype=dtype, device=device)
        return path, Grid.of(path.times, path.sizes, path.output_steps, like)


_cached_grid = functools.lru_cache(maxsize=16)(_build_grid)


def _pad_rows(y0: Tensor, full: int) -> Tensor:
    """``y0`` with copies of its first row up to ``full`` rows (real values: no NaN from a zero state),
    requiring grad as ``y0`` does (inside an autograd Function's forward the copy would not)."""
    padded = torch.cat([y0, y0[:1].expand(full - y0.shape[0], *y0.shape[1:])])
    return padded.requires_grad_() if y0.requires_grad and not padded.requires_grad else padded


def _rows_independent(run: Run, y0: Tensor, full: int) -> bool:
    """Whether the field treats the batch's rows apart, so a batch padded to ``full`` rows solves each
    real row as it would alone (its gradients too: the padding's cotangents are zero). Checked on one
    evaluation: padded, the field must return the unpadded rows to round-off (a field of a batch's own
    data, a CDE's path, or one mixing rows, is not padded and compiles for its shape)."""
    tolerance = dict(rtol=1e-12, atol=1e-14) if y0.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    try:
        with torch.enable_grad():
            alone = run.field(run.t_like, y0.detach())
            padded = run.field(run.t_like, _pad_rows(y0.detach(), full))
        return padded.shape[0] == full and torch.allclose(padded[: y0.shape[0]], alone, **tolerance)
    except Exception:  # noqa: BLE001 - a field that cannot take another batch size: compile for this one
        return False


# -- backward ----------------------------------------------------------------------------------
class EagerOps:
    """The reverse step's field and VJPs, eagerly: ``torch.autograd.grad`` on one step's graph."""

    def __init__(self, field: Any, params: list[Tensor], strategy: str) -> None:
        self.field = CountedField(field)
        self.params = params
        self.strategy = strategy
        self.checked = False

    def vjp(self, fn: Callable[[Any, Tensor], Tensor], x: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """``(fn(field, x), cot^T dfn/dx, cot^T dfn/dparams)``; ``None`` for unused parameters."""
        leaf = x.detach().requires_grad_()
        with torch.enable_grad():
            out = fn(self.field, leaf)
        if not self.checked:  # the backstop for a tensor the field reads that was not found
            check_no_hidden_inputs(out, [leaf, *self.params], self.strategy)
            self.checked = True
        xbar, *pbars = torch.autograd.grad(out, [leaf, *self.params], cotangent, allow_unused=True)
        return out.detach(), (torch.zeros_like(x) if xbar is None else xbar), pbars


class CompiledOps:
    """The reverse step's field and VJPs inside a compiled program: ``torch.func.vjp``."""

    def __init__(self, call: Callable[..., Tensor], params: tuple[Tensor, ...]) -> None:
        self.call, self.params = call, params
        self.field = lambda t, y: call(params, t, y)

    def vjp(self, fn: Callable[[Any, Tensor], Tensor], x: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        return func_vjp(lambda x, p: fn(lambda t, y: self.call(p, t, y), x), x, self.params, cotangent)


def add_grads(total: list[Tensor | None], grads: Sequence[Tensor | None], sign: float = 1.0) -> list[Tensor | None]:
    """``total + sign * grads`` entry by entry; ``None`` is zero."""
    out = list(total)
    for i, g in enumerate(grads):
        if g is not None:
            g = g if sign > 0 else -g
            out[i] = g if out[i] is None else out[i] + g
    return out


def _backward_eager(run: Run, forward: Forward, saved: Sequence[Tensor], grad_ys: Tensor) -> list[Tensor | None]:
    """The reverse loop in Python: one step's graph at a time; ``[ybar_0, *thetabar]``."""
    scheme, path, stats = run.scheme, forward.path, forward.stats
    ops = EagerOps(run.field, run.params, run.strategy)
    output_at: dict[int, list[int]] = {}
    for j, n in enumerate(path.output_steps):
        output_at.setdefault(n, []).append(j)
    param_grads: list[Tensor | None] = [None] * len(run.params)
    times, sizes, time = path.times, path.sizes, run.t_like.new_tensor

    bar = scheme.zero_bar(grad_ys[0])
    for j in output_at.get(path.steps, []):
        bar = scheme.add_output(bar, grad_ys[j])
    if scheme.keeps == "ends":
        state, y0 = scheme.unpack(saved[:-1]), saved[-1]
        reversal = iter(())
    else:
        states = saved[0] if forward.stacked else saved
        schedule = forward.schedule or Schedule(path.steps, None)
        stored = dict(zip(schedule.stored, states))
        held = HeldStates()
        step = scheme.step(ops.field)

        def advance(state: Tensor, a: int, b: int) -> Tensor:
            """The state at step ``b`` from the one at ``a``, without a graph."""
            with torch.no_grad():
                for n in range(a, b):
                    state = step(time(times[n]), state, sizes[n], None)[0]
            stats.recomputed_steps += b - a
            return state

        reversal = schedule.reversal(stored, advance, held.hold)
    # an adaptive solve with compile=: each step's reverse is one compiled program (its steps vary
    # in number and size from solve to solve, so there is no fixed loop to compile whole)
    reverse = _compiled_reverse(run) if run.adaptive_programs is not None else None
    compiled_steps = 0
    for n in reversed(range(path.steps)):
        t = time(times[n])
        t_first = time(times[n - 1]) + sizes[n - 1] if n > 0 and scheme.tableau.fsal else t
        # a recomputed state must not outlive its step: the reversal frees its buffers as it goes
        start = state if scheme.keeps == "ends" else next(reversal)[1]
        result = None if reverse is None else reverse(t, sizes[n], t_first, start, bar)
        if result is None:
            reverse = None  # it could not compile: the eager reverse, for this step and the rest
            state, bar, pbars = scheme.reverse(ops, t, sizes[n], t_first, start, bar)
        else:
            state, bar, pbars = result
            compiled_steps += 1
        del start
        param_grads = add_grads(param_grads, pbars)
        for j in output_at.get(n, []):
            bar = scheme.add_output(bar, grad_ys[j])
    stats.nfe_backward += ops.field.nfe + scheme.backward_nfe(compiled_steps)
    if scheme.keeps == "ends":
        scheme.after_backward(y0, state, run.extras)
    else:
        stats.held_bytes = max(stats.held_bytes, held.peak)
    return [scheme.y0_bar(bar), *param_grads]


def _compiled_reverse(run: Run) -> Callable[..., Any] | None:
    """One step's reverse (``Scheme.reverse``) as a compiled program, for adaptive solves:
    ``reverse(t, h, t_first, state, bar) -> (state, bar, pbars)``, or ``None`` from a call that runs
    eagerly instead. The step size enters as a 0-d tensor, so the steps of every size share one
    program per shapes (as :func:`~nde_zoo.driver.programs.adaptive_step` does forward)."""
    programs, scheme = run.adaptive_programs, run.scheme
    assert programs is not None
    params = tuple(run.params)
    names = functional_names(programs, run.field, params)
    if names is None:
        return None

    def build() -> Callable[..., Any]:
        def program(field, t, h, t_first, state, bar, *params):
            ops = CompiledOps(functional_field(field, names), params)
            state, bar, pbars = scheme.reverse(ops, t, h, t_first, state, bar)
            return state, bar, tuple(torch.zeros_like(p) if q is None else q for p, q in zip(params, pbars))

        return program

    def reverse(t: Tensor, h: float, t_first: Tensor, state: Any, bar: Any) -> Any:
        key = programs.key(f"{run.strategy}/reverse_step", run.field, [t, state, bar, *params], scheme.key())
        like = state[0] if isinstance(state, (tuple, list)) else state
        t_first = t_first.clone() if t_first is t else t_first  # one tensor as two inputs would recompile
        return programs.run(key, build, run.field, t, t.new_tensor(h), t_first, state, bar, *params,
                            example=(run.t_like, like.detach()))

    return reverse


def _backward_compiled(run: Run, forward: Forward, saved: Sequence[Tensor], grad_ys: Tensor) -> list[Tensor | None] | None:
    """The reverse loop as one compiled reverse scan; ``None`` when it runs eagerly instead.

    A uniform schedule is a scan over segments (last first) of a recomputing scan and a reverse
    scan; the binomial schedule's recursion does not fit a scan, so it reverses eagerly.
    """
    scheme, programs, path, stats = run.scheme, run.programs, forward.path, forward.stats
    schedule = forward.schedule
    assert programs is not None and forward.grid is not None
    if schedule is not None and not schedule.every and schedule.kind != "uniform":
        return None
    params = tuple(run.params)
    names = functional_names(programs, run.field, params)
    if names is None:
        return None
    ends = scheme.keeps == "ends"
    segment = 1 if schedule is None else schedule.segment
    count = 1 if ends else saved[0].shape[0]  # stored states
    padding = count * segment - path.steps if segment > 1 else 0  # identity steps (h = 0) after the end
    grid = forward.grid if not padding else forward.grid.padded(padding, path.times[-1])
    step_of = scheme.step

    def build() -> Callable[..., Any]:
        def program(field, saved, grad_rows, times, sizes, slots, *params):
            ops = CompiledOps(functional_field(field, names), params)
            firsts = torch.cat([times[:1], times[:-1] + sizes[:-1]]) if scheme.tableau.fsal else times

            def reverse(carry, x):
                state, bar, pbars = carry
                t, h, t_first, slot, *given = x
                state, bar, step_pbars = scheme.reverse(ops, t, h, t_first, state if ends else given[0], bar)
                pbars = tuple(p if q is None else p + q for p, q in zip(pbars, step_pbars))
                return (state if ends else (), scheme.add_output(bar, row(grad_rows, slot)), pbars), h.new_zeros(())

            def advance(y, x):
                y_next = step_of(ops.field)(x[0], y, x[1], None)[0]
                return y_next, y_next.clone()

            init = (scheme.unpack(saved[:-1]) if ends else (),
                    scheme.add_output(scheme.zero_bar(grad_rows[0]), row(grad_rows, slots[-1])),
                    tuple(torch.zeros_like(p) for p in params))
            xs = (times, sizes, firsts, slots[:-1])
            if segment == 1:
                carry, _ = scan(reverse, _fresh(init), xs if ends else (*xs, saved[0]), reverse=True)
            else:
                def segment_body(carry, x):
                    start, *seg_xs = x
                    _, later = scan(advance, start.clone(), (seg_xs[0][:-1], seg_xs[1][:-1]))
                    starts = torch.cat([start.unsqueeze(0), later])  # the segment's step starts, held at once
                    carry, _ = scan(reverse, carry, (*seg_xs, starts), reverse=True)
                    return carry, seg_xs[1].new_zeros(())

                shape = (count, segment)
                carry, _ = scan(segment_body, _fresh(init), (saved[0], *(x.reshape(shape) for x in xs)), reverse=True)
            state, bar, pbars = carry
            return scheme.pack(state) if ends else (), scheme.y0_bar(bar), pbars

        return program

    grad_rows = torch.cat([grad_ys, grad_ys.new_zeros((1, *grad_ys.shape[1:]))])  # row len(ts): no output
    key = programs.key(f"{run.strategy}/backward", run.field, [*saved, grad_rows, *params],
                       (*scheme.key(), grid.layout, segment))
    result = programs.run(key, build, run.field, saved, grad_rows, grid.times, grid.sizes, grid.slots, *params,
                          example=(run.t_like, grad_ys[0].detach()))
    if result is None:
        return None
    rebuilt, y0bar, pbars = result
    steps = count * segment if segment > 1 else path.steps  # with the padding: the program evaluates it
    recomputed = steps - count if segment > 1 else 0
    stats.recomputed_steps += recomputed - padding  # the solve's own steps (Schedule.recomputed_steps)
    stats.nfe_backward += scheme.backward_nfe(steps) + recomputed * scheme.step_evaluations(None)
    if segment > 1:  # the program holds a segment's step starts at once
        stats.held_bytes = max(stats.held_bytes, segment * saved[0][0].nelement() * saved[0].element_size())
    if ends:
        scheme.after_backward(saved[-1], scheme.unpack(rebuilt), run.extras)
    return [y0bar, *pbars]


# -- the fixed grid as tensors, and the forward scan -------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A fixed discretisation as tensors, for the scans.

    Attributes:
        times: ``(N,)`` step start times ``t_n``; sizes: ``(N,)`` step sizes ``h_n``.
        slots: ``(N + 1,)`` int64: for each step boundary ``n``, the output index ``j`` with
            ``output_steps[j] == n``, or ``len(ts)`` (a zero row) when ``n`` is no output time.
        output_steps: as :class:`~nde_zoo.solvers.Path`; segment: the common number of steps
            between consecutive outputs when they are all equal, else ``None``.
    """

    times: Tensor
    sizes: Tensor
    slots: Tensor
    output_steps: tuple[int, ...]
    segment: int | None

    @classmethod
    def of(cls, times: Sequence[float], sizes: Sequence[float], output_steps: Sequence[int], like: Tensor) -> Grid:
        n = len(sizes)
        slot_list = [len(output_steps)] * (n + 1)
        for j, step in enumerate(output_steps):
            slot_list[step] = j
        gaps = {b - a for a, b in zip(output_steps[:-1], output_steps[1:])}
        segment = next(iter(gaps)) if len(gaps) == 1 and output_steps[0] == 0 else None
        return cls(
            times=torch.tensor(list(times[:n]), dtype=like.dtype, device=like.device),
            sizes=torch.tensor(list(sizes), dtype=like.dtype, device=like.device),
            slots=torch.tensor(slot_list, dtype=torch.long, device=like.device),
            output_steps=tuple(output_steps),
            segment=segment,
        )

    @property
    def steps(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def layout(self) -> tuple[int, int | None, int]:
        """What a program bakes in: the steps, the uniform segment (or ``None``), the outputs.

        Where the outputs fall is data (:attr:`output_index`), not baked: moving an output
        time along the grid (ERNODE's sampled time) does not recompile.
        """
        return (self.steps, self.segment, len(self.output_steps))

    def padded(self, padding: int, end: float) -> Grid:
        """This grid with ``padding`` identity steps (``h = 0``) at its end time ``end``: whole segments
        for a uniform checkpoint schedule's reverse scan (kept with this grid, as cached as it is)."""
        cache = self.__dict__.setdefault("_padded", {})
        if padding not in cache:
            with torch.inference_mode(False):
                cache[padding] = Grid(
                    times=torch.cat([self.times, self.times.new_full((padding,), end)]),
                    sizes=torch.cat([self.sizes, self.sizes.new_zeros(padding)]),
                    slots=torch.cat([self.slots, self.slots.new_full((padding,), len(self.output_steps))]),
                    output_steps=self.output_steps, segment=self.segment)
        return cache[padding]

    @functools.cached_property  # a frozen dataclass keeps it in its __dict__: one tensor per (cached) grid
    def output_index(self) -> Tensor:
        """``(len(ts),)`` int64: the step boundary of each output time."""
        with torch.inference_mode(False):  # first read in validation, it also serves training
            return torch.tensor(self.output_steps, dtype=torch.long, device=self.slots.device)


def scan_forward(
    step: Callable[[Tensor, Any, Tensor, Any], tuple[Any, Any, Any]],
    state0: Any,
    carry0: Any,
    observe: Callable[[Any], Tensor],
    times: Tensor,
    sizes: Tensor,
    layout: tuple[int, int | None, int],
    output_index: Tensor,
    *,
    every_state: bool = False,
    nested: bool = True,
) -> tuple[Tensor, Any, Tensor | None]:
    """Run ``step`` over a fixed grid inside a compiled program; outputs at the output times.

    Args:
        step: ``step(t, state, h, carry) -> (state, error, carry)`` of the eager loop, ``h`` 0-d.
        state0 / carry0: the state at ``ts[0]`` and the step's reusable carry (or ``None``).
        observe: the solution tensor of a state (``(batch, *state)``).
        times / sizes / layout / output_index: from :class:`Grid`.
        every_state: also return the observed state at every step *start* (``(N, batch, ...)``).
        nested: allow the nested layout below. Autograd through nested scans fails in torch 2.13
            ("derivative for aten::detach_copy"), so a program differentiated by autograd passes ``False``.

    Returns:
        ``ys`` ``(len(ts), batch, *state)``, the final state, and the step-start states or ``None``.

    Layout: when the output times are equally many (more than one) steps apart, a scan over
    segments of a scan over steps keeps only the outputs, so memory stays flat in ``N``;
    otherwise one scan returns every state and the outputs are gathered from it.
    """
    steps, segment, _ = layout
    first = observe(state0)
    if steps == 0:
        return first.unsqueeze(0), state0, first.new_empty((0, *first.shape)) if every_state else None
    carry0 = () if carry0 is None else carry0  # scan carries only tensors

    def advance(carry: Any, x: tuple[Tensor, Tensor]) -> tuple[Any, Any]:
        state, reuse = carry
        state_next, _, reuse_next = step(x[0], state, x[1], None if reuse == () else reuse)
        return (state_next, () if reuse_next is None else reuse_next), state_next

    if nested and segment is not None and segment > 1 and not every_state:

        def inner(carry: Any, x: tuple[Tensor, Tensor]) -> tuple[Any, Tensor]:
            carry, _ = advance(carry, x)
            return carry, x[1].new_zeros(())

        def outer(carry: Any, x: tuple[Tensor, Tensor]) -> tuple[Any, Tensor]:
            carry, _ = scan(inner, carry, x)
            return carry, observe(carry[0]).clone()  # clone: scan forbids an output aliasing the carry

        xs = (times.reshape(steps // segment, segment), sizes.reshape(steps // segment, segment))
        (state, _), outputs = scan(outer, _fresh((state0, carry0)), xs)
        return torch.cat([first.unsqueeze(0), outputs]), state, None

    def body(carry: Any, x: tuple[Tensor, Tensor]) -> tuple[Any, Tensor]:
        carry, state_next = advance(carry, x)
        return carry, observe(state_next).clone()

    (state, _), every = scan(body, _fresh((state0, carry0)), (times, sizes))
    trajectory = torch.cat([first.unsqueeze(0), every])  # (N + 1, batch, ...)
    ys = trajectory if segment == 1 else trajectory.index_select(0, output_index)
    return ys, state, (trajectory[:-1] if every_state else None)


def row(rows: Tensor, index: Tensor) -> Tensor:
    """``rows[index]`` for a 0-d int64 tensor, without turning the index into a Python int
    (which would be a data-dependent graph break inside a scan body)."""
    return rows.index_select(0, index.reshape(1)).squeeze(0)


def _fresh(tree: Any) -> Any:
    """Clone every tensor of a scan's initial carry: scan refuses a carry aliasing its inputs."""
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, (tuple, list)):
        return type(tree)(_fresh(t) for t in tree)
    return tree
