"""What :class:`~nde_zoo.strategies.Auto` predicts and chooses: a plan, its rows, the tie rule.

Auto measures every candidate on two short prefixes of the real solve (``k/2`` and ``k`` steps,
:func:`nde_zoo.memory.measure_solve`) and asks the candidate's class to extrapolate them to the
full solve (``ODEStrategy.predict``, given a :class:`ProbeFit`): each strategy states its own
memory and time model there, so Auto contains none. The rows, the choice (:func:`choose`) and the
table a user reads (:meth:`Plan.markdown`) are here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from typing import Any

import torch
from torch import Tensor

from nde_zoo.memory import Probe, format_bytes

__all__ = ["Cost", "ProbeFit", "Row", "Plan", "choose", "MemoryBudgetError", "TIE_MARGIN", "snapshot_grid",
           "probe_times"]

#: fitting candidates whose predicted seconds are within this fraction of the fastest's are tied:
#: of them, the one keeping fewer states (the lowest predicted peak) is chosen.
TIE_MARGIN = 0.10


@dataclass(frozen=True)
class Cost:
    """A strategy's prediction for one solve's forward and backward at the full ``N``.

    ``snapshots``: the states a checkpointing strategy keeps (``None``: its default);
    ``detail``: what it keeps, for the table; ``flat``: its memory does not grow with ``N``
    (the no-fit error then suggests a smaller batch rather than fewer steps).
    """

    peak: float
    seconds: float
    snapshots: int | None = None
    detail: str = ""
    flat: bool = False


def _line(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    """The line through two points at ``x`` (slope clamped at >= 0: memory does not shrink
    with more steps, and round-off must not make it); one point: proportional."""
    if x2 == x1:
        return y2 * x / x2 if x2 else y2
    slope = max(0.0, (y2 - y1) / (x2 - x1))
    return y2 + slope * (x - x2)


@dataclass(frozen=True)
class ProbeFit:
    """A candidate's two probes, to extrapolate to a solve of ``steps`` steps and ``outputs`` outputs.

    ``attr`` is a :class:`~nde_zoo.memory.Probe` field: ``"forward_peak"`` / ``"backward_peak"``
    (bytes) or ``"forward"`` / ``"backward"`` (seconds).
    """

    probes: Sequence[Probe]
    steps: int
    outputs: int
    state_bytes: int  # one state, (batch, *state)
    adaptive: bool  # N estimated by a gradient-free adaptive solve

    def seconds(self, *attrs: str) -> float:
        """Seconds proportional to the longer probe's (a slope between two short timings is
        mostly noise); ``attrs`` default to forward and backward."""
        longer = self.probes[-1]
        return sum(getattr(longer, a) * self.steps / longer.steps for a in attrs or ("forward", "backward"))

    def grows(self, attr: str) -> float:
        """Linear in ``N`` through the two probes (a graph or a state per step), plus an output and
        its cotangent for each output time beyond those the probes' rate gives."""
        a, b = self.probes[0], self.probes[-1]
        beyond = self.outputs - _line(a.steps, a.outputs, b.steps, b.outputs, self.steps)
        return _line(a.steps, getattr(a, attr), b.steps, getattr(b, attr), self.steps) + \
            2.0 * self.state_bytes * max(0.0, beyond)

    def flat(self, attr: str) -> float:
        """Flat in ``N`` and linear in the output times (an output and its cotangent each)."""
        a, b = self.probes[0], self.probes[-1]
        ya, yb = getattr(a, attr), getattr(b, attr)
        if a.outputs != b.outputs:
            return _line(a.outputs, ya, b.outputs, yb, self.outputs)
        return max(ya, yb) + 2.0 * self.state_bytes * max(0, self.outputs - b.outputs)


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
    detail: str = ""  # what the candidate keeps, when its label does not say (Cost.detail)
    flat: bool = False  # its memory does not grow with N (Cost.flat)


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
                               f" ({r.detail})" if r.detail else "")
            mark = "**chosen**" if r.label == self.choice else ("yes" if r.fits else "no")
            per_step = r.seconds / max(self.steps, 1)
            peak = "not measured" if math.isinf(r.peak_bytes) else format_bytes(r.peak_bytes)  # the note says why
            lines.append(f"| {label} | {peak} | {per_step:.3g} | {r.seconds:.3g} | {mark} |"
                         + (f" {r.note}" if r.note else ""))
        tail = [f"\nchoice: {self.choice}" + (f" with snapshots={self.snapshots}" if self.snapshots is not None
                                             else "") + (f" ({self.tie})" if self.tie else "")]
        return "\n".join(head + lines + (tail if self.choice else ["\nchoice: none fits"]))

    def no_fit_message(self) -> str:
        """The error when no row fits: the smallest predicted peak and what would make it fit."""
        smallest = min(self.rows, key=lambda r: r.peak_bytes)
        if math.isinf(smallest.peak_bytes):
            why = "; ".join(f"{r.label}: {r.note}" for r in self.rows)
            return (f"strategy=auto: no candidate could be measured on {self.key} on {self.device} ({why}); "
                    f"for those out of memory use a smaller batch or a smaller field\n{self.markdown()}")
        fixes = ("a smaller batch or a larger budget (its memory does not grow with the number of steps)"
                 if smallest.flat else "fewer steps, a smaller batch, or a larger budget")
        return (
            f"strategy=auto: no candidate fits memory_budget={format_bytes(self.budget)} for {self.key} "
            f"(N = {self.steps}). The smallest predicted peak is {smallest.label}'s "
            f"{format_bytes(smallest.peak_bytes)}; make it fit with {fixes}: e.g. "
            f"strategy.memory_budget={math.ceil(smallest.peak_bytes * 1.1 / 1e6)}MB.\n{self.markdown()}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        rows = [Row(**r) for r in d.get("rows", [])]
        return cls(**{**d, "rows": rows})


class MemoryBudgetError(RuntimeError):
    """No candidate's predicted peak fits ``memory_budget``; ``plan`` holds the measured table."""

    def __init__(self, message: str, plan: Plan) -> None:
        super().__init__(message)
        self.plan = plan


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


def snapshot_grid(steps: int) -> list[int]:
    """Snapshot counts a checkpointing strategy is costed at: every count up to 16, then 15% apart."""
    counts = set(range(1, min(steps, 16) + 1))
    c = 16.0
    while c < steps:
        counts.add(int(c))
        c *= 1.15
    counts.add(steps)
    return sorted(counts)


def probe_times(ts: Tensor, grid: list[float], k: int) -> Tensor:
    """The output times of a probe over the first ``k`` steps of ``grid``: those of ``ts`` that fall
    inside (outputs cost memory too), and its end."""
    end = grid[k]
    direction = 1.0 if grid[-1] >= grid[0] else -1.0
    inside = [t for t in ts.tolist()[1:] if (end - t) * direction > 0]
    prefix = ts.new_tensor([grid[0], *inside, end])
    if len(prefix) > 2:  # in ts's dtype an output may coincide with the end: strictly monotone
        keep = torch.cat([prefix.new_ones(1, dtype=torch.bool), (prefix[1:] - prefix[:-1]) * direction > 0])
        prefix = prefix[keep]
    return prefix
