"""The stepping loop: fixed or adaptive, landing exactly on every output time.

The loop is generic over *what a step is*: the plain RK step for most strategies, the
coupled ``(Y, Z)`` step for the reversible one. It returns the outputs and a
:class:`Path`: the accepted step times and sizes (plain floats), which strategies with
their own backward pass replay exactly.
"""

from __future__ import annotations

import itertools
import math
import weakref
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, TypeVar

import torch
from torch import Tensor

from nde_zoo.solvers.errors import MaxStepsExceeded, NonFiniteStateError, StepSizeUnderflow
from nde_zoo.solvers.rk import Field, rk_step
from nde_zoo.solvers.stepping import PIController, Stepping, error_ratio, fixed_grid_array, initial_step_size
from nde_zoo.solvers.tableau import ButcherTableau

__all__ = [
    "Path",
    "SolveStats",
    "CountedField",
    "check_inputs",
    "check_finite_outputs",
    "fixed_path",
    "hairer_first_step",
    "integrate",
    "rk_stepper",
    "odeint",
]

State = TypeVar("State")


@dataclass
class SolveStats:
    """What a solve cost. ``nfe_backward`` is filled in by strategies during ``backward()``."""

    nfe_forward: int = 0
    nfe_backward: int = 0
    accepted_steps: int = 0
    rejected_steps: int = 0
    #: steps recomputed without a graph during backward (checkpointing schedules)
    recomputed_steps: int = 0
    #: the most bytes of recomputed states the backward pass held at once outside autograd's saved
    #: tensors (the checkpointing reversal's snapshots): memory a saved-bytes count does not see
    held_bytes: int = 0


@dataclass
class Path:
    """The discretisation a forward solve chose.

    Attributes:
        times: ``N + 1`` step boundaries ``t_0 < ... < t_N`` (or decreasing): an ``array('d')``,
            8 bytes a step (a list of Python floats took 32: +95 MiB for a 10^6-step solve);
            indexing gives Python floats, exactly as stored.
        output_steps: for each output time ``ts[j]``, the number of steps taken to reach it
            (``times[output_steps[j]] == ts[j]`` exactly).
        sizes: the ``N`` step sizes exactly as passed to the step function (``array('d')``). Replay
            with these, not ``times[n + 1] - times[n]``, which can differ in the last bit.
        states: the state at each step start when recorded (``N`` entries), else empty.
        final_state: the state at the last output time (e.g. the reversible ``(Y, Z)`` pair).
    """

    times: array
    output_steps: list[int]
    sizes: array = dataclass_field(default_factory=lambda: array("d"))
    states: list[Any] = dataclass_field(default_factory=list)
    final_state: Any = None

    def __post_init__(self) -> None:
        # Compact float64 arrays whatever the caller passed (a list, a tuple, another array).
        if not isinstance(self.times, array):
            self.times = array("d", self.times)
        if not isinstance(self.sizes, array):
            self.sizes = array("d", self.sizes)

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def step_sizes(self) -> list[float]:
        """The step sizes as taken (alias of :attr:`sizes`)."""
        return list(self.sizes)


def _describe_shape(name: str, shape: tuple[int, ...]) -> str:
    dims = ["batch"] + [f"state dim {i}" for i in range(1, len(shape))]
    return f"{name} {tuple(shape)} (" + ", ".join(f"{d}={n}" for d, n in zip(dims, shape)) + ")"


class CountedField:
    """Wraps ``f(t, y)``: counts evaluations and checks the first output against the state.

    The check explains each dimension (torchcde's ``_check_compatability`` style).
    """

    def __init__(self, field: Field) -> None:
        self.field = field
        self.nfe = 0
        self._checked = False

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        out = self.field(t, y)
        if not self._checked:
            self._check(y, out)
            self._checked = True
        return out

    @staticmethod
    def _check(y: Tensor, out: Any) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"the vector field must return a tensor, got {type(out).__name__}")
        if out.shape != y.shape:
            mismatched = [
                f"dimension {i}: field gives {a}, state has {b}"
                for i, (a, b) in enumerate(zip(out.shape, y.shape))
                if a != b
            ]
            if out.dim() != y.dim():
                mismatched.append(f"field output has {out.dim()} dimensions, state has {y.dim()}")
            raise ValueError(
                f"the vector field returned shape {tuple(out.shape)} but the state y0 is "
                f"{_describe_shape('shape', tuple(y.shape))}; f(t, y) must return dy/dt with the "
                f"shape of y. Mismatch: " + "; ".join(mismatched)
            )
        if out.dtype != y.dtype or out.device != y.device:
            raise TypeError(
                f"the vector field returned {out.dtype} on {out.device} for a state of {y.dtype} on "
                f"{y.device}; cast the field (e.g. field.to(y0)) so the two agree"
            )


def check_inputs(y0: Tensor, ts: Tensor) -> list[float]:
    """Validate ``y0`` and ``ts`` once per solve; return ``ts`` as Python floats."""
    if not isinstance(y0, Tensor) or not isinstance(ts, Tensor):
        raise TypeError("y0 and ts must be tensors")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got {y0.dtype}")
    if y0.dim() < 1:
        raise ValueError("y0 must have shape (batch, *state); got a 0-d tensor")
    if y0.numel() == 0:
        what = "the batch is empty (0 samples)" if y0.shape[0] == 0 else "the state has no entries"
        raise ValueError(
            f"y0 has shape {tuple(y0.shape)}: {what}, so there is nothing to solve. An empty batch comes from a "
            f"DataLoader (a filter or mask that dropped every sample, a last partial batch of a sharded set): "
            f"skip it before the solve, or use drop_last=True"
        )
    if ts.dim() != 1 or ts.numel() < 1:
        raise ValueError(f"ts must be a non-empty 1-D tensor of times, got shape {tuple(ts.shape)}")
    if ts.dtype != y0.dtype:
        raise TypeError(f"ts is {ts.dtype} but y0 is {y0.dtype}; pass ts.to(y0) so both share a dtype")
    if ts.device != y0.device:
        raise TypeError(f"ts is on {ts.device} but y0 is on {y0.device}; move both to one device")
    return list(_checked_times(ts))


#: The last ``ts`` checked: ``(weak reference, version counter, its times)``. A training loop solves
#: on the same ``ts`` tensor every step; reading 1,000 times back and checking them took a twentieth
#: of a compiled white-dwarf step (N = 1000). An in-place change bumps the version and is checked again.
_last_times: tuple[Any, int, tuple[float, ...]] | None = None


def _checked_times(ts: Tensor) -> tuple[float, ...]:
    """``ts`` as Python floats, checked finite and strictly monotone (memoised for the last ``ts``)."""
    global _last_times
    try:
        version = ts._version
    except RuntimeError:  # an inference-mode tensor has no version counter: checked every time
        return _check_times(ts.tolist())
    last = _last_times
    if last is not None and last[0]() is ts and last[1] == version:
        return last[2]
    times = _check_times(ts.tolist())
    _last_times = (weakref.ref(ts), version, times)
    return times


def _check_times(times: list[float]) -> tuple[float, ...]:
    if not all(math.isfinite(t) for t in times):
        raise ValueError(f"ts must be finite, got {times}")
    if len(times) > 1:
        diffs = [b - a for a, b in zip(times[:-1], times[1:])]
        if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
            bad = next(i for i, d in enumerate(diffs) if d == 0 or (d > 0) != (diffs[0] > 0))
            raise ValueError(
                f"ts must be strictly monotone (all increasing or all decreasing) with no duplicates; "
                f"ts[{bad}] = {times[bad]} and ts[{bad + 1}] = {times[bad + 1]} break it"
            )
    return tuple(times)


def check_finite_outputs(ys: Tensor, ts: list[float], field: Any = None) -> None:
    """One sync per solve: name the first output time whose state is not finite.

    The cause is named: a NaN/inf ``y0`` is bad input; with ``field`` given, a field that returns
    NaN/inf at the last finite output state (NaN weights, NaN data it reads) is the field's fault,
    not a blow-up of the dynamics (one extra evaluation, only on this error path).
    """
    if bool(torch.isfinite(ys.detach()).all()):
        return
    finite = torch.isfinite(ys.detach().reshape(ys.shape[0], -1)).all(dim=1)
    j = int((~finite).nonzero()[0])
    if j == 0:  # the first output is y0 itself: bad input, not a blow-up
        rows = torch.isfinite(ys[0].detach().reshape(ys.shape[1], -1)).all(dim=1) if ys.ndim > 1 else finite[:1]
        bad = (~rows).nonzero().flatten().tolist() or [0]
        raise NonFiniteStateError(
            f"the initial state y0 is NaN or infinite at t={ts[0]} in {len(bad)} of {len(rows)} batch entries "
            f"(first: index {bad[0]}): the input data (or the encoder that produced y0) has NaN/inf; clean or "
            f"impute the data, e.g. torch.nan_to_num, or mask the missing values"
        )
    if field is not None:
        with torch.no_grad():
            t_last = torch.as_tensor(ts[j - 1], dtype=ys.dtype, device=ys.device)
            out = field(t_last, ys[j - 1].detach())
        if isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
            raise NonFiniteStateError(
                f"the vector field returned NaN or infinity at t={ts[j - 1]} for a finite state (the state became "
                f"NaN by t={ts[j]}): its parameters or the tensors it reads hold NaN/inf (a diverged training "
                f"step?); check the field's weights and any data it reads"
            )
    since = f" (it was finite at t={ts[j - 1]})"
    raise NonFiniteStateError(
        f"the state became NaN or infinite by t={ts[j]}{since}; the dynamics blew up or the step is "
        f"too large: reduce the step size, use an adaptive solver, or check the data for NaN/inf"
    )


Step = Callable[[Tensor, State, float, Any], "tuple[State, Tensor | None, Any]"]


class StateStore:
    """Step-start states kept across a solve, in buffers allocated once (or in chunks).

    Keeping each state as its own small tensor fragments the CPU heap: glibc carves it from the
    hole a freed temporary of the field (a hidden activation of megabytes) left, the next
    temporary no longer fits there, and the heap grows by one hole per step (measured:
    Symplectic's forward grew peak RSS by 199 MB for 0.8 MB of states). Copying each state into
    one buffer of ``capacity`` states (fixed steps: ``N``), or into chunks of ``CHUNK`` states
    (adaptive), allocates once per buffer instead. Non-tensor states (tuples) are kept as they are.
    """

    CHUNK = 64

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._chunks: list[Tensor] = []
        self._count = 0  # states written into the last chunk
        self._others: list[Any] = []

    def append(self, state: Any) -> None:
        if not isinstance(state, Tensor):
            self._others.append(state)
            return
        if not self._chunks or self._count == self._chunks[-1].shape[0]:
            size = self.capacity if (self.capacity and not self._chunks) else self.CHUNK
            self._chunks.append(state.new_empty((size, *state.shape)))
            self._count = 0
        self._chunks[-1][self._count].copy_(state)
        self._count += 1

    def states(self) -> list[Any]:
        """The states in order, as views into the buffers."""
        if self._others:
            return self._others
        if self._chunks and self._count < self._chunks[-1].shape[0]:
            # trim the partly filled last chunk to one exact allocation (what is kept is N states)
            self._chunks[-1] = self._chunks[-1][: self._count].clone()
            self._count = self._chunks[-1].shape[0]
        views: list[Any] = []
        for chunk in self._chunks:
            views.extend(chunk.unbind(0))
        return views


def integrate(
    step: Step,
    state0: State,
    observe: Callable[[State], Tensor],
    ts: list[float],
    t_like: Tensor,
    stepping: Stepping,
    order: int,
    *,
    first_step: Callable[[], float] | None = None,
    record_states: bool | Sequence[int] = False,
    controller: PIController = PIController(),
) -> tuple[list[Tensor], Path, SolveStats]:
    """Integrate from ``ts[0]``, returning the observed state at every output time.

    Args:
        step: ``step(t, state, h, carry) -> (state_next, error | None, carry_next)``;
            ``carry`` is what may be reused by the next step (an FSAL stage), ``None`` at first.
        state0: the state at ``ts[0]``.
        observe: maps a state to the solution tensor (``(batch, *state)``).
        ts: output times (validated by :func:`check_inputs`).
        t_like: a 0-d tensor giving the dtype and device of times passed to the field.
        stepping: fixed or adaptive; ``order`` is the method's order for the controller.
        first_step: computes the initial adaptive step (Hairer) when ``stepping.dt0`` is unset.
        record_states: keep the state at each step start in ``Path.states``; or, for fixed
            steps, only at the step starts listed (a checkpointing schedule's stored positions).

    Raises:
        MaxStepsExceeded, StepSizeUnderflow, NonFiniteStateError (adaptive: at the step).
    """
    outputs = [observe(state0)]
    path = Path(times=[ts[0]], output_steps=[0])
    stats = SolveStats()
    path.final_state = state0
    if len(ts) == 1:
        return outputs, path, stats
    state, carry = state0, None

    def as_time(t: float) -> Tensor:
        return t_like.new_tensor(t)

    planned = None if stepping.adaptive else fixed_path(ts, stepping)
    positions = None if isinstance(record_states, bool) else frozenset(record_states)
    store = StateStore(None if planned is None else (planned.steps if positions is None else len(positions)))
    if planned is not None:
        outputs_at = set(planned.output_steps)
        for n, (t_a, h) in enumerate(zip(planned.times, planned.sizes)):  # sizes is one shorter
            if record_states if positions is None else n in positions:
                store.append(state)
            state, _, carry = step(as_time(t_a), state, h, carry)
            if n + 1 in outputs_at:
                outputs.append(observe(state))
        path.times, path.sizes, path.output_steps = planned.times, planned.sizes, planned.output_steps
        stats.accepted_steps = planned.steps
        path.final_state, path.states = state, store.states()
        return outputs, path, stats

    rtol, atol = float(stepping.rtol or 0.0), float(stepping.atol or 0.0)
    direction = 1.0 if ts[-1] > ts[0] else -1.0
    t = ts[0]
    h = direction * abs(stepping.dt0) if stepping.dt0 is not None else (
        direction * abs(first_step()) if first_step is not None else direction * abs(ts[-1] - ts[0]) / 100
    )
    eps = torch.finfo(t_like.dtype).eps
    prev_ratio = 1.0
    next_out = 1
    attempts = 0
    while next_out < len(ts):
        if attempts >= stepping.max_steps:
            raise MaxStepsExceeded(
                f"max_steps={stepping.max_steps} steps were taken and the solve reached only t={t:.6g} "
                f"of [{ts[0]:.6g}, {ts[-1]:.6g}]; raise max_steps, loosen rtol/atol, or check that the "
                f"dynamics are not stiff or blowing up"
            )
        attempts += 1
        if abs(h) <= 4 * eps * max(1.0, abs(t)):
            raise StepSizeUnderflow(
                f"the adaptive step size underflowed to {h:.3g} at t={t:.6g} (rtol={rtol}, atol={atol}); "
                f"the dynamics are stiff or singular there: loosen rtol/atol, use float64, or "
                f"regularise the model"
            )
        target = ts[next_out]
        lands = (t + h - target) * direction >= 0
        h_try = target - t if lands else h
        new_state, error, new_carry = step(as_time(t), state, h_try, carry)
        assert error is not None, "adaptive stepping needs an error estimate"
        ratio_t = error_ratio(error.detach(), observe(state).detach(), observe(new_state).detach(), rtol, atol)
        ratio = float(ratio_t)  # the one host sync per step that adaptive control needs
        if not math.isfinite(ratio):
            bad = observe(new_state)
            if not bool(torch.isfinite(bad).all()) or not bool(torch.isfinite(error).all()):
                raise NonFiniteStateError(
                    f"the state became NaN or infinite in the step from t={t:.6g} to t={t + h_try:.6g}; "
                    f"check the data and the field for NaN/inf, or lower the learning rate"
                )
            ratio = math.inf
        h_next = controller.propose(h_try, ratio, prev_ratio, order) if math.isfinite(ratio) else h_try * controller.dfactor
        if ratio <= 1.0:
            if record_states:
                store.append(state)
            state, carry = new_state, new_carry
            t = target if lands else t + h_try
            path.times.append(t)
            path.sizes.append(h_try)
            stats.accepted_steps += 1
            prev_ratio = max(ratio, 1e-4)
            if lands:
                outputs.append(observe(state))
                path.output_steps.append(len(path.times) - 1)
                next_out += 1
                h_next = direction * max(abs(h_next), abs(h)) if abs(h_try) < abs(h) else h_next
        else:
            stats.rejected_steps += 1
        h = h_next
    path.final_state, path.states = state, store.states()
    return outputs, path, stats


def fixed_path(ts: list[float], stepping: Stepping) -> Path:
    """The steps a fixed-step solve takes, decided before it runs (no state is touched).

    ``times`` is :func:`~nde_zoo.solvers.stepping.fixed_grid`, ``sizes`` the differences as
    passed to the step function, ``output_steps`` where each output time falls. The eager loop
    and the compiled scans (:mod:`nde_zoo.driver.loop`) both step along this path.
    """
    grid = fixed_grid_array(ts, stepping)
    path = Path(times=grid, output_steps=[0], sizes=array("d", (b - a for a, b in itertools.pairwise(grid))))
    next_out = 1
    for n, t_b in enumerate(itertools.islice(grid, 1, None), start=1):
        if next_out < len(ts) and t_b == ts[next_out]:
            path.output_steps.append(n)
            next_out += 1
    return path


def hairer_first_step(
    field: Field, t0: Tensor, y0: Tensor, tableau: ButcherTableau, stepping: Stepping
) -> Callable[[], float] | None:
    """The initial adaptive step as torchdiffeq picks it (Hairer), or ``None`` when not needed."""
    if not stepping.adaptive or stepping.dt0 is not None:
        return None

    def first_step() -> float:
        with torch.no_grad():
            f0 = field(t0, y0)
            return initial_step_size(field, t0, y0, f0, tableau.order - 1, float(stepping.rtol or 0.0),
                                     float(stepping.atol or 0.0))

    return first_step


def rk_stepper(field: Field, tableau: ButcherTableau) -> Step:
    """The plain RK step for :func:`integrate` (and the compiled scans): the FSAL stage is the carry."""

    def step(t: Tensor, y: Tensor, h: float, k1: Tensor | None) -> tuple[Tensor, Tensor | None, Any]:
        result = rk_step(field, t, y, h, tableau, k1)
        return result.y, result.error, (result.stages[-1] if tableau.fsal else None)

    return step


def odeint(
    field: Field,
    y0: Tensor,
    ts: Tensor,
    tableau: ButcherTableau,
    stepping: Stepping,
    *,
    record_states: bool = False,
    step_factory: Callable[[CountedField], Step] | None = None,
) -> tuple[Tensor, Path, SolveStats]:
    """Solve ``dy/dt = field(t, y)`` with plain RK steps; differentiable by ordinary autograd.

    Returns ``ys`` of shape ``(len(ts), *y0.shape)``, the :class:`Path` and the stats.
    Step sizes are plain floats, so no gradient flows through step-size selection (as in
    diffrax): every exact strategy differentiates the same discretisation. ``step_factory``
    replaces :func:`rk_stepper` (a compiled step of the same arithmetic; it must count NFE on
    the :class:`CountedField` it is given).
    """
    stepping.check(tableau)
    times = check_inputs(y0, ts)
    counted = CountedField(field)
    t_like = ts[0]
    if stepping.adaptive:  # a NaN y0 would otherwise surface as a step-size underflow
        check_finite_outputs(y0.unsqueeze(0), times[:1])
    first_step = hairer_first_step(counted, t_like, y0, tableau, stepping)
    step = rk_stepper(counted, tableau) if step_factory is None else step_factory(counted)
    outputs, path, stats = integrate(
        step, y0, lambda y: y, times, t_like, stepping, tableau.order,
        first_step=first_step, record_states=record_states,
    )
    ys = torch.stack(outputs)
    check_finite_outputs(ys, times, field)
    stats.nfe_forward = counted.nfe
    return ys, path, stats
