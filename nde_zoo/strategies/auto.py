"""Auto: the fastest exact strategy whose memory fits a budget, measured on the real solve.

No strategy wins everywhere: ``Direct`` is fastest while its graph fits,
``Checkpoint`` trades recomputation for snapshots, ``Symplectic`` keeps ``N`` states and one
stage's graph, ``Reversible`` keeps nothing per step at a few times the cost. Which one a user
wants depends on the field, the batch, ``N`` and the machine, so :class:`Auto` measures instead
of guessing:

1. On a solve with gradients (a training step) whose key is new (batch shape, dtype, device
   type, number of steps, field class), it *probes* every candidate on the real ``field``,
   ``y0`` and a short prefix of the grid (``k/2`` and ``k`` steps, ``k = probe_steps``, with
   the output times that fall inside): one forward solve and one backward pass with a unit
   cotangent, measuring the most the allocator holds above what it held before, during the
   forward and during the backward apart (CUDA: ``max_memory_allocated``; CPU: the running
   total of the profiler's memory events, :class:`AllocatorPeak`: the field's transient
   activations, the backward's temporaries and the gradients are all in it), and the seconds
   (the best of three timed runs of the longer prefix, interleaved across candidates).
2. It extrapolates each candidate to the full ``N`` with the known shape of its memory, fitted
   to the two probes: ``Direct``, ``Symplectic`` and ``Checkpoint`` (every step start) linear
   in ``N`` (the graph of every step; ``N`` states plus one stage; ``N`` states plus one step's
   graph), ``Reversible`` flat in ``N`` and linear in the outputs (an output, and its
   cotangent, per output time). ``Checkpoint`` with ``c`` snapshots holds ``N - kept(c)``
   states less in its backward, and its forward stores only the ``c`` snapshots; every ``c`` on a
   grid is costed by the :class:`~nde_zoo.strategies.schedule.Schedule` the solve follows, and
   the fastest that fits is chosen.
   Time is linear in ``N`` (plus the recomputed steps for ``Checkpoint``). Adaptive solves first run
   one gradient-free solve of the full span (it keeps nothing for backward) to count ``N``,
   and probe on the span of its first ``k`` steps; the table says ``N`` is estimated.
3. It chooses the fastest candidate whose predicted peak fits ``memory_budget`` (a candidate
   wins on time only by more than :data:`TIE_MARGIN`: of those within it of the fastest, the
   one keeping fewer states, the lowest predicted peak, is chosen, so timing noise between two
   identical runs does not flip the choice; the table says when a tie was broken) and delegates
   this and every later solve with that key to it (:attr:`Auto.chosen`), so gradients are
   exactly the chosen strategy's. If none fits it raises :class:`MemoryBudgetError` naming the
   smallest predicted peak and what would make it fit, before any training step runs out of
   memory. On CUDA an out-of-memory error during probing counts as "does not fit".

Solves without gradients (validation, test, predict) never probe: they use the latest choice
(a plain ``Direct`` solve before any). The choices and their tables are in :meth:`state_dict`
(a resumed run, ``test ckpt_path=`` and ``load_from_checkpoint`` reuse them without probing).
Under DDP rank 0 probes and broadcasts its plan, so every rank runs the same strategy.
``python -m nde_zoo plan`` prints the table for a model's first batch before training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field as dataclass_field
from typing import Any

import torch
from torch import Tensor

from nde_zoo.solvers import ButcherTableau, check_inputs, fixed_path, odeint
from nde_zoo.strategies._autograd import NonDeterministicFieldError
from nde_zoo.strategies.base import (
    COMPILABLE,
    GradientStrategy,
    LiveSaved,
    ODEStrategy,
    Solution,
    field_parameters,
    takes_stepping,
)
from nde_zoo.strategies.checkpoint import Checkpoint
from nde_zoo.strategies.direct import Direct
from nde_zoo.strategies.reversible import Reversible
from nde_zoo.strategies.symplectic import Symplectic

__all__ = ["Auto", "MemoryBudgetError", "Plan", "parse_bytes", "format_bytes", "choose", "CANDIDATES",
           "CHOICE_CODES", "TIE_MARGIN"]

log = logging.getLogger("nde_zoo")

#: the exact strategies Auto can choose among (config names).
CANDIDATES = ("direct", "checkpoint", "symplectic", "reversible")
_CLASSES: dict[str, type[ODEStrategy]] = {
    "direct": Direct, "checkpoint": Checkpoint, "symplectic": Symplectic, "reversible": Reversible,
}
#: ``auto/choice`` as logged (a metric must be a number): the index of the chosen label here.
CHOICE_CODES = {label: i for i, label in enumerate(
    [*CANDIDATES, *(f"{name}+compile" for name in CANDIDATES)])}
#: timed runs of each candidate's longer probe, interleaved across candidates (the best counts)
TIMING_ROUNDS = 3
#: plans kept per Auto (one per key); beyond it the latest choice serves new keys, with a warning.
MAX_PLANS = 16
#: fitting candidates whose predicted seconds are within this fraction of the fastest's are tied:
#: of them, the one keeping fewer states (the lowest predicted peak) is chosen.
TIE_MARGIN = 0.10

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``2GB`` -> 2e9 bytes (kB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary); an integer is bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory_budget must be a size, got {value!r}")
    if isinstance(value, (int, float)):
        if not (value >= 1 and math.isfinite(value)):
            raise ValueError(f"memory_budget must be a positive number of bytes, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"memory_budget={value!r} is not a size: give bytes (an integer) or a positive number with a unit, "
            f"e.g. 512MB, 2GB, 1.5GiB"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise ValueError(f"memory_budget={value!r} is less than one byte; give e.g. 512MB or 2GB")
    return size


def format_bytes(n: float) -> str:
    """``1.5e9`` -> ``"1.50 GB"`` (decimal units, as ``memory_budget`` reads them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_memory(device: torch.device) -> int:
    """What ``memory_budget=None`` means: the device's free memory (CUDA), or MemAvailable (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class MemoryBudgetError(RuntimeError):
    """No candidate's predicted peak fits ``memory_budget``; ``plan`` holds the measured table."""

    def __init__(self, message: str, plan: Plan) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass
class Row:
    """One candidate of a plan: its prediction at the full ``N`` and whether it fits."""

    label: str  # "direct", "checkpoint", ... ("+compile" for compiled variants)
    peak_bytes: float  # predicted peak memory of one solve's forward and backward
    seconds: float  # predicted seconds of one solve's forward and backward
    fits: bool
    snapshots: int | None = None  # Checkpoint: the snapshot count chosen (None: every step start)
    note: str = ""  # out of memory while probing, a fallback, ...
    probes: list[dict[str, float]] = dataclass_field(default_factory=list)  # the measurements


@dataclass
class Plan:
    """What :class:`Auto` measured and chose for one key."""

    key: str
    steps: int  # N: the steps of the full solve (estimated for adaptive stepping)
    estimated: bool  # N from a gradient-free solve (adaptive), not fixed by the grid
    budget: int
    device: str
    rows: list[Row]
    choice: str | None = None  # the chosen row's label
    snapshots: int | None = None
    tie: str = ""  # how a tie was broken (see TIE_MARGIN); empty when the fastest won outright

    @property
    def chosen_row(self) -> Row | None:
        return next((r for r in self.rows if r.label == self.choice), None)

    def markdown(self) -> str:
        """The table: candidate, predicted peak, seconds per step, fits?, and the choice."""
        n = f"N = {self.steps}" + (" (estimated from one gradient-free adaptive solve)" if self.estimated else "")
        head = [f"strategy=auto for {self.key}: {n}, memory budget {format_bytes(self.budget)} ({self.device})", "",
                "| candidate | peak memory | s per step | s per solve | fits? |", "|---|--:|--:|--:|:-:|"]
        lines = []
        for r in self.rows:
            label = r.label + (f" (snapshots={r.snapshots})" if r.snapshots is not None else
                               " (every step start)" if _CLASSES[r.label.partition("+")[0]].takes_snapshots
                               and not self.estimated
                               else "")
            mark = "**chosen**" if r.label == self.choice else ("yes" if r.fits else "no")
            per_step = r.seconds / max(self.steps, 1)
            peak = "not measured" if math.isinf(r.peak_bytes) else format_bytes(r.peak_bytes)  # the note says why
            lines.append(f"| {label} | {peak} | {per_step:.3g} | {r.seconds:.3g} | {mark} |"
                         + (f" {r.note}" if r.note else ""))
        tail = [f"\nchoice: {self.choice}" + (f" with snapshots={self.snapshots}" if self.snapshots is not None
                                             else "") + (f" ({self.tie})" if self.tie else "")]
        return "\n".join(head + lines + (tail if self.choice else ["\nchoice: none fits"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        rows = [Row(**r) for r in d.get("rows", [])]
        return cls(**{**d, "rows": rows})


@dataclass
class _Probe:
    """A candidate measured at one prefix of the grid."""

    steps: int  # accepted steps of the probe solve
    peak: float  # bytes: the larger of the two below
    forward: float  # seconds
    backward: float  # seconds
    forward_peak: float = 0.0  # bytes the allocator held at most during the forward solve (above its start)
    backward_peak: float = 0.0  # ... during the backward pass (the forward's kept tensors included)
    outputs: int = 2  # output times of the probe solve

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def choose(rows: Sequence[Row], steps: int = 1) -> tuple[Row | None, str]:
    """The row :class:`Auto` chooses among ``rows`` and, when a tie decided it, why (else ``""``).

    Of the rows that fit, those whose seconds are within :data:`TIE_MARGIN` of the fastest's are
    tied, and the one keeping fewer states (the lowest predicted peak; then the faster) wins: a
    candidate wins on time only by more than the margin. ``None``: nothing fits."""
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return None, ""
    fastest = min(fitting, key=lambda r: (r.seconds, r.peak_bytes))
    tied = [r for r in fitting if r.seconds <= fastest.seconds * (1.0 + TIE_MARGIN)]
    best = min(tied, key=lambda r: (r.peak_bytes, r.seconds))
    if best is fastest:
        return best, ""
    n = max(steps, 1)
    return best, (f"tie broken: {fastest.label} was faster, {fastest.seconds / n:.3g} against "
                  f"{best.seconds / n:.3g} s per step, within the {TIE_MARGIN:.0%} margin, so the one "
                  f"keeping fewer states wins: {format_bytes(best.peak_bytes)} against "
                  f"{format_bytes(fastest.peak_bytes)}")


def _fit(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    """The line through two points at ``x`` (slope clamped at >= 0: memory does not shrink
    with more steps, and round-off must not make it); one point: proportional."""
    if x2 == x1:
        return y2 * x / x2 if x2 else y2
    slope = max(0.0, (y2 - y1) / (x2 - x1))
    return y2 + slope * (x - x2)


class Auto(ODEStrategy):
    """Choose, by measuring, the fastest exact strategy whose memory fits ``memory_budget``.

    Args:
        solver, steps / step_size, rtol / atol / max_steps: as every ODE strategy; the chosen
            strategy solves with these.
        memory_budget: bytes (an integer) or a size such as ``"2GB"``, ``"512MB"``, ``"1.5GiB"``;
            ``None``: what the device has free (CUDA) or the machine's available memory (CPU).
            It bounds what the allocator holds during one solve's forward and backward, above
            what it held before (module docstring: what is measured).
        candidates: config names among ``direct``, ``checkpoint``, ``symplectic``, ``reversible``.
        compile: ``True``/``"strict"``/``"reduce-overhead"`` adds the compiled variant of every
            candidate (``direct+compile``, ...) for fixed steps (docs/compile.md).
        probe_steps: ``k``, the longest prefix probed (``k/2`` and ``k`` steps; at most ``N``).

    Gradient: exactly the chosen strategy's (all candidates are exact for the discretisation;
    ``Reversible``'s discretisation is its own reversible scheme). Memory and time: the chosen
    one's, plus one probe per key (a few steps of each candidate).
    """

    name = "auto"
    compilable = True  # passes compile= to its candidates

    @takes_stepping
    def __init__(
        self,
        solver: str | ButcherTableau = "dopri5",
        *,
        memory_budget: int | float | str | None = None,
        candidates: Sequence[str] = CANDIDATES,
        probe_steps: int = 8,
        **stepping: Any,
    ) -> None:
        super().__init__(solver, **stepping)
        self.memory_budget = parse_bytes(memory_budget)
        if isinstance(candidates, str):
            candidates = [c.strip() for c in candidates.split(",")]
        candidates = tuple(str(c) for c in candidates)
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown or not candidates:
            raise ValueError(f"unknown candidate(s) {', '.join(unknown) or '(none given)'} for strategy=auto; "
                             f"choose among {', '.join(CANDIDATES)} (exact strategies with their own memory shape)")
        self.candidates = candidates
        if int(probe_steps) != probe_steps or probe_steps < 2:
            raise ValueError(f"probe_steps must be an integer >= 2, got {probe_steps!r}")
        self.probe_steps = int(probe_steps)
        st = self.stepping  # what the candidates are built with (the compile choice apart)
        self._stepping_args = {"steps": st.steps, "step_size": st.step_size, "rtol": st.rtol, "atol": st.atol,
                               "max_steps": st.max_steps}
        self.plans: dict[str, Plan] = {}
        self._built: dict[str, ODEStrategy] = {}  # key -> the chosen strategy, built from its plan
        self._latest: str | None = None  # the key of the latest choice
        self._new_choice: str | None = None  # a key chosen during this training step (logged at its end)
        self.probes = 0  # how many plans this Auto measured (a resumed run measures none for known keys)
        self.announce = True  # log each new plan's table (``plan`` prints it itself)
        self._overflow_warned = False

    # -- the public view ----------------------------------------------------------------------
    @property
    def chosen(self) -> ODEStrategy | None:
        """The strategy the latest choice delegates to (``None`` before the first choice)."""
        return None if self._latest is None else self._strategy_for(self._latest)

    @property
    def plan(self) -> Plan | None:
        """The plan of the latest choice (its table: ``plan.markdown()``)."""
        return None if self._latest is None else self.plans.get(self._latest)

    # -- solving -------------------------------------------------------------------------------
    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        times = check_inputs(y0, ts)
        key, steps = self._key(field, y0, times)
        if torch.is_grad_enabled() and len(times) >= 2 and len(self.plans) < MAX_PLANS:
            if _any_rank(key not in self.plans, y0.device):  # under DDP every rank decides together
                self._decide(key, field, y0, ts, times, steps)
        elif key not in self.plans and torch.is_grad_enabled() and not self._overflow_warned:
            self._overflow_warned = True
            log.warning("strategy=auto: %d distinct solves (batch shape, dtype, device, steps) have been "
                        "planned; new ones (%s) use the latest choice without probing", MAX_PLANS, key)
        if key in self.plans:
            self._latest = key
            strategy = self._strategy_for(key)
        elif self._latest is not None:  # gradient-free: the latest choice's discretisation
            strategy = self._strategy_for(self._latest)
        else:  # gradient-free before any choice: keeps nothing for backward, any strategy fits
            strategy = self._build("direct", None)
        return self._record(strategy.solve(field, y0, ts, params=params))

    def _key(self, field: Any, y0: Tensor, times: list[float]) -> tuple[str, int | None]:
        if self.stepping.adaptive:
            n, what = None, f"span [{times[0]:g}, {times[-1]:g}] with {len(times)} outputs"
        else:
            n = fixed_path(times, self.stepping).steps
            what = f"{n} steps"
        shape = "x".join(str(s) for s in y0.shape)
        dtype = str(y0.dtype).removeprefix("torch.")
        return f"{type(field).__name__} with a {shape} {dtype} state on {y0.device.type}, {what}", n

    def _strategy_for(self, key: str) -> ODEStrategy:
        if key not in self._built:
            plan = self.plans[key]
            assert plan.choice is not None
            self._built[key] = self._build(plan.choice, plan.snapshots)
        return self._built[key]

    def _build(self, label: str, snapshots: int | None, stepping: dict[str, Any] | None = None) -> ODEStrategy:
        name, _, compiled = label.partition("+")
        cls = _CLASSES[name]
        kwargs = dict(self._stepping_args if stepping is None else stepping)
        # snapshots set a fixed-step schedule (a plan loaded from a fixed-step run may carry them)
        kwargs.update(cls.planned_arguments(None if self.stepping.adaptive else snapshots, bool(compiled)))
        return cls(self.tableau, compile=self.compile if compiled else False, **kwargs)

    # -- deciding --------------------------------------------------------------------------------
    def _decide(self, key: str, field: Any, y0: Tensor, ts: Tensor, times: list[float], steps: int | None) -> None:
        """Probe (rank 0 under DDP), choose, and keep the plan; raise if nothing fits."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed:
            plan = self.measure(field, y0, ts, times, steps, key)
        else:  # rank 0 probes; the others wait for its plan (or its error: no rank may hang)
            box: list[Any] = [None]
            if dist.get_rank() == 0:
                try:
                    box = [self.measure(field, y0, ts, times, steps, key).to_dict()]
                except Exception as exc:
                    dist.broadcast_object_list([f"{type(exc).__name__}: {exc}"], src=0)
                    raise
            dist.broadcast_object_list(box, src=0)
            if isinstance(box[0], str):
                raise RuntimeError(f"strategy=auto: probing failed on rank 0 ({box[0]})")
            plan = Plan.from_dict(box[0])
        self.probes += 1
        if plan.choice is None:
            raise MemoryBudgetError(_no_fit_message(plan), plan)
        self.plans[key] = plan
        self._new_choice = key
        if self.announce and _rank() == 0:  # once per key, not once per rank
            self._announce(plan.markdown())

    def _announce(self, text: str) -> None:
        """Log ``text`` (a new plan's table). A process spawned for DDP (``ddp_spawn``) starts
        with no logging configured, so Python would drop the message: there it goes where the
        launching process logged (its console and log files, recorded when this Auto was pickled)."""
        if log.hasHandlers() or not getattr(self, "_log_targets", None):
            log.info("%s", text)
            return
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (text,), None)
        for kind, where, fmt, datefmt in self._log_targets:
            handler: logging.Handler
            if kind == "file":
                handler = logging.FileHandler(where, mode="a", delay=True)
            else:
                handler = logging.StreamHandler(sys.stdout if kind == "stdout" else sys.stderr)
            handler.setFormatter(logging.Formatter(fmt, datefmt))
            try:
                handler.handle(record)
            finally:
                handler.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_log_targets"] = _log_targets(log)  # for a process spawned from this one (DDP)
        return state

    def measure(self, field: Any, y0: Tensor, ts: Tensor, times: list[float] | None = None,
                steps: int | None = None, key: str | None = None) -> Plan:
        """Probe every candidate on ``(field, y0, ts)`` and return the plan (``plan.choice`` is
        ``None`` when nothing fits). Called by :meth:`solve`; public for ``plan`` and the bench."""
        times = check_inputs(y0, ts) if times is None else times
        if key is None or (steps is None and not self.stepping.adaptive):
            key, steps = self._key(field, y0, times)
        budget = self.memory_budget if self.memory_budget is not None else available_memory(y0.device)
        estimated = steps is None
        if steps is None:  # adaptive: count the steps of one gradient-free solve (keeps nothing)
            with torch.no_grad():
                _, path, _ = odeint(field, y0.detach(), ts, self.tableau, self.stepping)
            grid = path.times
            steps = max(path.steps, 1)
        else:
            grid = fixed_path(times, self.stepping).times
        k2 = min(steps, self.probe_steps)
        k1 = max(1, k2 // 2)
        labels = list(self.candidates)
        if self.compile.enabled and not self.stepping.adaptive:
            labels += [f"{c}+compile" for c in self.candidates if c in COMPILABLE]
        probed = {label: self._probe(label, field, y0, ts, grid, k1, k2) for label in labels}
        refusals = [p for p in probed.values() if isinstance(p, Exception)]
        if len(refusals) == len(probed):  # refused by all: the field's own error (a wrong shape, ...)
            raise refusals[0]
        # Seconds: the longer probe of every candidate again, interleaved round by round (so a
        # busy moment of the machine hits all alike), the best of TIMING_ROUNDS.
        prefix, stepping = self._prefix(ts, grid, k2)
        timed = {label: self._build(label, None, stepping) for label, probes in probed.items()
                 if isinstance(probes, list)}
        for _ in range(TIMING_ROUNDS):
            for label, strategy in timed.items():
                run = _measure(strategy, field, y0, prefix, repeats=0, memory=False)
                longer = probed[label][-1]
                longer.forward, longer.backward = min(longer.forward, run.forward), min(longer.backward, run.backward)
        state_bytes = y0.nelement() * y0.element_size()
        rows = [self._predict(label, probed[label], steps, len(times), state_bytes, budget) for label in labels]
        plan = Plan(key=key, steps=steps, estimated=estimated, budget=budget, device=str(y0.device), rows=rows)
        best, plan.tie = choose(rows, steps)
        if best is not None:
            plan.choice, plan.snapshots = best.label, best.snapshots
        return plan

    def _prefix(self, ts: Tensor, grid: list[float], k: int) -> tuple[Tensor, dict[str, Any]]:
        """Output times and stepping of a probe over the first ``k`` steps of ``grid``: the output
        times of ``ts`` that fall inside, and its end (outputs cost memory too)."""
        end = grid[k]
        direction = 1.0 if grid[-1] >= grid[0] else -1.0
        inside = [t for t in ts.tolist()[1:] if (end - t) * direction > 0]
        prefix = ts.new_tensor([grid[0], *inside, end])
        if len(prefix) > 2:  # in ts's dtype an output may coincide with the end: strictly monotone
            keep = torch.cat([prefix.new_ones(1, dtype=torch.bool), (prefix[1:] - prefix[:-1]) * direction > 0])
            prefix = prefix[keep]
        stepping = dict(self._stepping_args)
        if not self.stepping.adaptive:
            stepping.update(steps=k, step_size=None)
        return prefix, stepping

    def _probe(self, label: str, field: Any, y0: Tensor, ts: Tensor, grid: list[float], k1: int,
               k2: int) -> list[_Probe] | None:
        """Peak memory of ``label`` on the first ``k1`` and ``k2`` steps; ``None``: out of memory."""
        probes: list[_Probe] = []
        try:
            for k in dict.fromkeys((k1, k2)):  # one probe when k1 == k2
                prefix, stepping = self._prefix(ts, grid, k)
                # Checkpoint is probed keeping every step start: its memory is then linear in the
                # snapshots it keeps, and the snapshot count that fits is chosen below.
                probes.append(_measure(self._build(label, None, stepping), field, y0, prefix, repeats=0))
        except torch.OutOfMemoryError:
            if y0.device.type == "cuda":
                torch.cuda.empty_cache()
            return "out of memory while probing"
        except (ValueError, NonDeterministicFieldError) as exc:  # this candidate refuses the field
            return exc
        return probes

    def _predict(self, label: str, probes: list[_Probe] | str | Exception, steps: int, outputs: int,
                 state_bytes: int, budget: int) -> Row:
        cls = _CLASSES[label.partition("+")[0]]
        if isinstance(probes, Exception):
            return Row(label, math.inf, math.inf, False, note=f"refused: {str(probes).splitlines()[0]}")
        if isinstance(probes, str):
            return Row(label, math.inf, math.inf, False, note=probes)
        a, b = probes[0], probes[-1]
        per_output = 2.0 * state_bytes  # an output state, and its cotangent in the backward pass

        def line(attr: str, x: float) -> float:
            if attr in ("forward", "backward"):  # seconds: proportional to the longer probe (a slope
                return getattr(b, attr) * x / b.steps  # between two short timings is mostly noise)
            ya, yb = getattr(a, attr), getattr(b, attr)
            if not cls.memory_grows_with_steps:  # flat in N, linear in the outputs
                if a.outputs != b.outputs:
                    return _fit(a.outputs, ya, b.outputs, yb, outputs)
                return max(ya, yb) + per_output * max(0, outputs - b.outputs)
            # linear in N; outputs beyond those the prefix's rate gives (the prefix may hold none)
            beyond = outputs - _fit(a.steps, a.outputs, b.steps, b.outputs, steps)
            return _fit(a.steps, ya, b.steps, yb, x) + per_output * max(0.0, beyond)

        recorded = [p.as_dict() for p in probes]
        peak = max(line("forward_peak", steps), line("backward_peak", steps))
        seconds = line("forward", steps) + line("backward", steps)
        if not cls.takes_snapshots or self.stepping.adaptive:  # adaptive: every step start (ACA)
            return Row(label, peak, seconds, peak <= budget, probes=recorded)
        return self._choose_snapshots(label, line, steps, state_bytes, budget, recorded)

    def _choose_snapshots(self, label: str, line: Any, steps: int, state_bytes: int, budget: int,
                          recorded: list[dict[str, float]]) -> Row:
        """Checkpoint: the fastest snapshot count that fits, and its time.

        Probed keeping every step start (``N`` states), its backward peak holds ``N - kept(c)``
        states more than with ``c`` snapshots, its forward peak ``N - stored(c)`` more. The counts
        of :func:`_snapshot_grid` are costed and the fastest that fits is chosen: ``stored(c)``,
        ``kept(c)`` and the recomputation are the :class:`~nde_zoo.strategies.schedule.Schedule`'s
        own (``stored``, ``peak_states``, ``recomputed_steps``) for the schedule the built
        Checkpoint follows (its ``planned_schedule``).
        """
        name, _, compiled_mark = label.partition("+")
        cls, compiled = _CLASSES[name], bool(compiled_mark)
        per_step_forward = max(0.0, line("forward", steps) / steps)
        forward_peak, backward_peak = line("forward_peak", steps), line("backward_peak", steps)
        every = steps  # every step start

        def cost(c: int) -> tuple[float, float]:
            schedule = cls.planned_schedule(steps, c, compiled)  # what the built strategy will follow
            stored, kept, recomputed = len(schedule.stored), schedule.peak_states, schedule.recomputed_steps
            seconds = line("forward", steps) + line("backward", steps) + per_step_forward * recomputed
            # the forward keeps only the stored states (the probe kept every step start)
            return max(forward_peak - state_bytes * max(0, every - stored),
                       backward_peak - state_bytes * max(0, every - kept)), seconds

        peak = max(forward_peak, backward_peak)
        if peak <= budget:  # every step start fits: no recomputation
            return Row(label, peak, line("forward", steps) + line("backward", steps), True,
                       snapshots=None, probes=recorded)
        # Neither the peak nor the recomputation is monotone in c (the binomial spine, the compiled
        # segments), so every count on a grid is costed and the fastest that fits wins.
        costed = {c: cost(c) for c in _snapshot_grid(steps)}
        fitting = {c: v for c, v in costed.items() if v[0] <= budget}
        if not fitting:
            c = min(costed, key=lambda k: (costed[k][0], costed[k][1]))
            return Row(label, *costed[c], False, snapshots=c, probes=recorded)
        c = min(fitting, key=lambda k: (fitting[k][1], -k))
        return Row(label, *fitting[c], True, snapshots=c, probes=recorded)

    # -- Lightning: log the choice, keep the plans -----------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        chosen = self.chosen
        if chosen is not None and chosen.programs.pending_seconds:
            self.programs.pending_seconds += chosen.programs.pending_seconds
            chosen.programs.pending_seconds = 0.0
        if self._new_choice is not None:
            # Once, at the step that chose: a value given to ``pl_module.log`` would be logged again
            # at every later step. Straight to the loggers (rank 0), at the step Lightning logs
            # this batch's figures at.
            plan = self.plans[self._new_choice]
            code = float(CHOICE_CODES[plan.choice or "direct"])
            connector = getattr(trainer, "_logger_connector", None)
            if connector is not None:
                connector.log_metrics({"auto/choice": code})
            else:
                for logger in trainer.loggers:
                    logger.log_metrics({"auto/choice": code}, step=trainer.global_step)
            trainer.callback_metrics["auto/choice"] = torch.tensor(code)
            self._new_choice = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def state_dict(self) -> dict[str, Any]:
        return {"plans": {k: p.to_dict() for k, p in self.plans.items()}, "latest": self._latest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plans = {k: Plan.from_dict(p) for k, p in state_dict.get("plans", {}).items()}
        self._built.clear()
        latest = state_dict.get("latest")
        self._latest = latest if latest in self.plans else None
        if self._latest is not None:  # a resume says what it restored, in the log and the metrics
            plan = self.plans[self._latest]
            snapshots = f" (snapshots={plan.snapshots})" if plan.snapshots is not None else ""
            log.info("strategy=auto: restored the choice %s%s for %s from the checkpoint (no probing)",
                     plan.choice or "none", snapshots, self._latest)
            self._new_choice = self._latest

    def __repr__(self) -> str:
        budget = "available memory" if self.memory_budget is None else format_bytes(self.memory_budget)
        chosen = f", chosen={self.plan.choice}" if self.plan is not None else ""
        return (f"Auto(solver={self.tableau.name!r}, {self.stepping.describe()}, memory_budget={budget}, "
                f"candidates={','.join(self.candidates)}{chosen})")


def _measure(strategy: GradientStrategy, field: Any, y0: Tensor, ts: Tensor, repeats: int = 3,
             memory: bool = True) -> _Probe:
    """One solve's forward and backward (unit cotangent): the most the allocator held above what
    it held before, during the forward and during the backward (unless ``memory`` is false: one
    timed run only), then the better of ``repeats`` timed runs. Gradients go to
    ``torch.autograd.grad``, never into ``.grad``."""
    params = field_parameters(field)
    y0 = y0.detach().requires_grad_(y0.requires_grad)
    inputs = ([y0] if y0.requires_grad else []) + params
    cuda = y0.device.type == "cuda"

    def run(meter: AllocatorPeak | None) -> tuple[int, float, float, float, float]:
        counted = meter is not None and meter.available  # the allocator, by profiler events
        estimated = meter is not None and not counted and not cuda  # under a user's profiler
        if cuda:
            torch.cuda.synchronize(y0.device)
            base = torch.cuda.memory_allocated(y0.device)
            torch.cuda.reset_peak_memory_stats(y0.device)
        start = time.perf_counter()
        with meter.phase("forward") if counted else contextlib.nullcontext():
            solution = strategy.solve(field, y0, ts)
        forward_peak = backward_peak = 0.0
        if cuda:
            torch.cuda.synchronize(y0.device)
            forward_peak = torch.cuda.max_memory_allocated(y0.device) - base
            torch.cuda.reset_peak_memory_stats(y0.device)
        middle = time.perf_counter()
        with meter.phase("backward") if counted else contextlib.nullcontext():
            cotangent = torch.ones_like(solution.ys)
            if inputs and solution.ys.requires_grad:
                if estimated:  # autograd's own count: what was kept plus what the backward held
                    live = LiveSaved(params + LiveSaved.kept_by(solution.ys))
                    with live.hooks:
                        torch.autograd.grad(solution.ys, inputs, cotangent, allow_unused=True)
                    backward_peak = solution.saved_bytes + live.peak + solution.stats.held_bytes
                else:
                    torch.autograd.grad(solution.ys, inputs, cotangent, allow_unused=True)
            del cotangent
        if cuda:
            torch.cuda.synchronize(y0.device)
            backward_peak = torch.cuda.max_memory_allocated(y0.device) - base
        end = time.perf_counter()
        return solution.stats.accepted_steps, float(forward_peak), float(backward_peak), middle - start, end - middle

    if memory and not cuda:
        with AllocatorPeak() as meter:
            steps, forward_peak, backward_peak, forward, backward = run(meter)
        if meter.available:  # the events are read when the profiler stops
            forward_peak, backward_peak = meter.peak("forward"), meter.peak("backward")
        else:
            _warn_once("another profiler is running, so the probes' memory is autograd's count (what is kept "
                       "for backward plus what the backward holds), not the allocator's: the budget may be "
                       "exceeded by the field's transient tensors")
    else:
        steps, forward_peak, backward_peak, forward, backward = run(None)
    for _ in range(repeats):
        _, _, _, f, b = run(None)
        forward, backward = min(forward, f), min(backward, b)
    return _Probe(steps=max(steps, 1), peak=max(forward_peak, backward_peak), forward=forward, backward=backward,
                  forward_peak=forward_peak, backward_peak=backward_peak, outputs=len(ts))


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("strategy=auto: %s", message)


class AllocatorPeak:
    """The most bytes the CPU allocator held at once, above what it held when the block began.

    Made of the profiler's memory events (``torch.profiler`` with ``profile_memory=True``: every
    allocation and free of the CPU allocator, in order): the running total of those events is
    what the allocator holds above the start; its maximum, over the whole block or within the
    intervals marked with :meth:`phase`, is the peak. This is what a user checks with the
    profiler (docs/auto.md), and on the CPU what :class:`Auto` probes and budgets.

    Frees of memory allocated before the block are not in the events (the profiler cannot size
    them), so the peak never reads low. While another profiler runs (a user's), this one cannot
    start: :attr:`available` is false and :meth:`peak` raises.
    """

    def __init__(self) -> None:
        from torch.autograd.profiler import _is_profiler_enabled

        self.available = not _is_profiler_enabled
        self._profiler: Any = None
        self._events: list[tuple[int, int]] = []  # (time ns, bytes: + allocated, - freed)
        self._phases: dict[str, list[tuple[int, int]]] = {}  # name -> [(start ns, end ns)]

    def __enter__(self) -> AllocatorPeak:
        if self.available:
            from torch.profiler import ProfilerActivity, profile

            # The profiler writes lines of its own to stderr (starting, stopping, a warning about
            # memory allocated before it): kept out of the console for the whole block.
            self._quiet = _quiet_profiler()
            self._quiet.__enter__()
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            try:
                self._profiler.__enter__()
            except RuntimeError:  # another profiler is running on this thread
                self._profiler = None
                self.available = False
                self._quiet.__exit__(None, None, None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._profiler is None:
            return
        try:
            self._profiler.__exit__(*exc)
        finally:
            self._quiet.__exit__(None, None, None)
        cpu = torch._C._autograd.DeviceType.CPU
        marks: dict[str, list[tuple[int, int]]] = {}
        for event in self._profiler.profiler.kineto_results.events():
            name = event.name()
            if name == "[memory]":
                if event.device_type() == cpu:
                    self._events.append((event.start_ns(), event.nbytes()))
            elif name.startswith(_PHASE):
                marks.setdefault(name[len(_PHASE):], []).append((event.start_ns(), event.end_ns()))
        self._events.sort(key=lambda e: e[0])
        self._phases = marks
        self._profiler = None

    def phase(self, name: str) -> Any:
        """A ``with`` block whose allocations :meth:`peak` ``(name)`` looks at."""
        from torch.profiler import record_function

        return record_function(_PHASE + name)

    def mark(self, name: str) -> None:
        """An instant named ``name`` (e.g. from a gradient hook): :meth:`peak` can start there."""
        with self.phase(name):
            pass

    def peak(self, *phases: str, since: str | None = None, until: str | None = None) -> float:
        """The most held at once within the named phases (none named: the whole block), or from
        the instant ``since`` to the end of the phase ``until``."""
        if not self.available:
            raise RuntimeError("the allocator's peak is unknown: another profiler was running")
        windows = [w for name in phases for w in self._phases.get(name, [])]
        if since is not None and until is not None:
            starts, ends = self._phases.get(since, []), self._phases.get(until, [])
            if starts and ends:
                windows.append((starts[0][0], ends[-1][1]))
        if not phases and since is None:
            windows = [(-1, 2**63)]
        live = best = 0
        for when, nbytes in self._events:
            live += nbytes
            if live > best and any(a <= when <= b for a, b in windows):
                best = live
        return float(best)


_PHASE = "nde_zoo.auto::"


@contextlib.contextmanager
def _quiet_profiler() -> Any:
    """Starting and stopping the profiler writes lines of its own to the process's stderr (file
    descriptor 2); keep those out of the user's console and log, and pass on everything else."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not re.search(r"ActivityProfiler|profiler_st(art|op)|CPUAllocator\.cpp", line)]
            if kept:
                os.write(2, "".join(kept).encode())


def _rank() -> int:
    """This process's rank in the default process group (0 outside one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _log_targets(logger: logging.Logger) -> list[tuple[str, str, str | None, str | None]]:
    """Where ``logger``'s INFO records go: ``(kind, file or stream, format, date format)`` per
    handler (files, stdout, stderr), to reopen in a spawned process. None when ``logger`` drops
    INFO records."""
    targets: list[tuple[str, str, str | None, str | None]] = []
    if not logger.isEnabledFor(logging.INFO):
        return targets
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if handler.level > logging.INFO:
                continue
            formatter = handler.formatter
            fmt = getattr(formatter, "_fmt", None)
            datefmt = getattr(formatter, "datefmt", None)
            if isinstance(handler, logging.FileHandler):
                targets.append(("file", handler.baseFilename, fmt, datefmt))
            elif isinstance(handler, logging.StreamHandler):
                stream = getattr(handler, "stream", None)
                if stream is sys.stdout or getattr(stream, "fileno", None) and _fd(stream) == 1:
                    targets.append(("stdout", "", fmt, datefmt))
                elif stream is sys.stderr or _fd(stream) == 2:
                    targets.append(("stderr", "", fmt, datefmt))
        current = current.parent if current.propagate else None
    return targets


def _fd(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the ranks of a process group (just ``flag`` outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _snapshot_grid(steps: int) -> list[int]:
    """Snapshot counts Checkpoint is costed at: every count up to 16, then 15% apart."""
    counts = set(range(1, min(steps, 16) + 1))
    c = 16.0
    while c < steps:
        counts.add(int(c))
        c *= 1.15
    counts.add(steps)
    return sorted(counts)


def _no_fit_message(plan: Plan) -> str:
    smallest = min(plan.rows, key=lambda r: r.peak_bytes)
    if math.isinf(smallest.peak_bytes):
        why = "; ".join(f"{r.label}: {r.note}" for r in plan.rows)
        return (f"strategy=auto: no candidate could be measured on {plan.key} on {plan.device} ({why}); "
                f"for those out of memory use a smaller batch or a smaller field\n{plan.markdown()}")
    # Reversible's memory, and Checkpoint's with one snapshot, do not grow with the number of steps
    flat = not _CLASSES[smallest.label.partition("+")[0]].memory_grows_with_steps or smallest.snapshots == 1
    fixes = ("a smaller batch or a larger budget (its memory does not grow with the number of steps)" if flat
             else "fewer steps, a smaller batch, or a larger budget")
    return (
        f"strategy=auto: no candidate fits memory_budget={format_bytes(plan.budget)} for {plan.key} "
        f"(N = {plan.steps}). The smallest predicted peak is {smallest.label}'s "
        f"{format_bytes(smallest.peak_bytes)}; make it fit with {fixes}: e.g. "
        f"strategy.memory_budget={math.ceil(smallest.peak_bytes * 1.1 / 1e6)}MB.\n{plan.markdown()}"
    )
