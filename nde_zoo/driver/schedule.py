"""Checkpointing schedules: which step starts a solve stores, and how its reversal gets the rest.

One :class:`Schedule` object answers every question about a checkpointed solve of ``steps``
fixed steps with ``snapshots`` stored states: which step starts the forward pass stores
(:attr:`Schedule.stored`), how many states are alive at once during the reversal
(:attr:`Schedule.peak_states`), how many steps the reversal recomputes without a graph
(:attr:`Schedule.recomputed_steps`), and the reversal itself (:meth:`Schedule.reversal`). The
eager reversal, the compiled program and :class:`~nde_zoo.strategies.Auto`'s memory and time
model all read the same object, so a change to a schedule cannot silently break a prediction.

Two kinds:

- ``"uniform"`` (the default): the states ``segment = ceil(steps / snapshots)`` steps apart are
  stored; the reversal recomputes one segment's step starts at a time (each step once) and holds
  them in one buffer. Peak: ``S + segment`` states; recomputed: ``steps - S`` steps. It is one program
  compiled (a scan over segments of a scan over steps), and the faster of the two.
- ``"binomial"``: Revolve (Griewank & Walther, "Algorithm 799: Revolve", ACM TOMS 2000). With
  ``c`` snapshots each step is recomputed at most ``r`` times, ``r`` the smallest integer with
  ``C(c + r, c) >= steps``; peak about ``2c`` states, for more recomputation. Its recursion does
  not fit one scan, so with ``compile=`` its forward is compiled and its reversal runs eagerly.

``snapshots=None`` stores every step start (no recomputation; also what adaptive solves do,
Zhuang et al.'s ACA).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from math import comb
from typing import Any

from torch import Tensor

__all__ = [
    "SCHEDULES",
    "Schedule",
    "binomial_peak_states",
    "binomial_recomputations",
    "binomial_repetitions",
    "binomial_split",
]

SCHEDULES = ("uniform", "binomial")


def binomial_repetitions(steps: int, snapshots: int) -> int:
    """The smallest ``r`` with ``beta(c, r) = C(c + r, c) >= steps`` for ``c = snapshots``."""
    r = 0
    while comb(snapshots + r, snapshots) < steps:
        r += 1
    return r


def binomial_split(steps: int, free: int) -> int:
    """Where to store the next state in a span of ``steps`` with ``free`` snapshots left.

    The span's start is stored, so ``c = free + 1``. The left part is reversed later with one
    repetition fewer, the right part with one snapshot fewer:
    ``beta(c, r) = beta(c, r - 1) + beta(c - 1, r)``, so the split is ``beta(c, r - 1)``.
    """
    c = free + 1
    r = binomial_repetitions(steps, c)
    return max(1, min(comb(c + r - 1, c), steps - 1))


def binomial_recomputations(steps: int, snapshots: int | None) -> int:
    """Steps the binomial reversal recomputes (``Schedule(steps, snapshots, "binomial")``)."""
    return Schedule(steps, snapshots, "binomial").recomputed_steps


def binomial_peak_states(steps: int, snapshots: int | None) -> int:
    """States the binomial reversal keeps alive at once (``Schedule(..., "binomial")``)."""
    return Schedule(steps, snapshots, "binomial").peak_states


Advance = Callable[[Tensor, int, int], Tensor]


@dataclass(frozen=True)
class Schedule:
    """Which step starts of a ``steps``-step solve are stored, and how the reversal replays the rest.

    Args:
        steps: ``N``, the fixed steps of the solve.
        snapshots: stored states, the initial one included; ``None``: every step start.
        kind: ``"uniform"`` or ``"binomial"`` (module docstring).
    """

    steps: int
    snapshots: int | None = None
    kind: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {self.kind!r}")

    @property
    def every(self) -> bool:
        """Whether every step start is stored (nothing is recomputed)."""
        return self.snapshots is None or self.steps <= 1 or self.snapshots >= self.steps

    @property
    def segment(self) -> int:
        """Uniform: the steps between stored states, ``ceil(steps / snapshots)`` (1: every step start)."""
        return 1 if self.every else -(-self.steps // self.snapshots)

    @property
    def stored(self) -> tuple[int, ...]:
        """The step starts the forward pass stores, in order (``0`` first)."""
        if self.every:
            return tuple(range(self.steps))
        if self.kind == "uniform":
            return tuple(range(0, self.steps, self.segment))
        positions, a, free = [0], 0, self.snapshots - 1  # the first descent of the recursion
        while self.steps - a > 1 and free > 0:
            a += binomial_split(self.steps - a, free)
            positions.append(a)
            free -= 1
        return tuple(positions)

    @property
    def recomputed_steps(self) -> int:
        """Steps the reversal advances without a graph (``SolveStats.recomputed_steps``)."""
        return self._walk()[0]

    @property
    def peak_states(self) -> int:
        """The most states alive at once during the reversal: the stored ones plus the recomputed
        ones it holds (``Solution.saved_bytes + SolveStats.held_bytes``, in states)."""
        return len(self.stored) + self._walk()[1]

    def _walk(self) -> tuple[int, int]:
        """``(recomputed steps, most recomputed states held at once)``, without running anything."""
        return _walk(self.steps, self.snapshots, self.kind)

    def reversal(
        self, stored: Mapping[int, Tensor], advance: Advance, hold: Callable[[Tensor], Tensor] = lambda s: s
    ) -> Iterator[tuple[int, Tensor]]:
        """The state at each step start, last step first: ``(n, state_n)`` for ``n = N-1 .. 0``.

        ``stored`` maps the positions of :attr:`stored` to their states; ``advance(state, a, b)``
        returns the state at ``b`` from the one at ``a`` without a graph (and counts it); every
        state the reversal keeps beyond the stored ones passes through ``hold`` (which may count
        it). A recomputed state is held exactly as long as the reversal still needs it.
        """
        if self.every:
            for n in reversed(range(self.steps)):
                yield n, stored[n]
        elif self.kind == "uniform":
            for a in reversed(range(0, self.steps, self.segment)):
                b = min(a + self.segment, self.steps)
                # the segment's step starts in one buffer, as the compiled program holds them
                starts = hold(stored[a].new_empty((b - a, *stored[a].shape)))
                starts[0] = stored[a]
                for n in range(a + 1, b):
                    starts[n - a] = advance(starts[n - a - 1], n - 1, n)
                for n in reversed(range(a, b)):
                    yield n, starts[n - a]
                del starts
        else:
            yield from _revolve(self.steps, self.snapshots, stored, advance, hold)


def _revolve(
    steps: int, snapshots: int, stored: Mapping[int, Tensor], advance: Advance, hold: Callable[[Tensor], Tensor]
) -> Iterator[tuple[int, Tensor]]:
    """The binomial reversal: depth first, right span before left, with an explicit stack (the
    recursion's depth grows with the snapshots: a thousand overflowed Python's stack). A pending
    span holds its start state exactly as long as the recursive call's frame would."""

    def state_at(state: Tensor, a: int, b: int) -> Tensor:
        return stored[b] if b in stored and b != a else hold(advance(state, a, b))

    spans = [(0, steps, stored[0], snapshots - 1)]
    while spans:
        a, b, state, free = spans.pop()
        if b - a == 1:
            yield a, state
        elif free == 0:
            for k in reversed(range(a, b)):
                yield k, state if k == a else state_at(state, a, k)
        else:
            m = a + binomial_split(b - a, free)
            spans.append((a, m, state, free))
            spans.append((m, b, state_at(state, a, m), free - 1))
        del state  # the pending spans hold what is still needed


@functools.lru_cache(maxsize=1024)
def _walk(steps: int, snapshots: int | None, kind: str) -> tuple[int, int]:
    """The reversal simulated on integers: ``(recomputed steps, peak recomputed states held)``."""
    schedule = Schedule(steps, snapshots, kind)
    if schedule.every:
        return 0, 0
    stored = set(schedule.stored)
    if kind == "uniform":
        return steps - len(stored), schedule.segment
    recomputed, peak = 0, 0
    spans = [(0, steps, snapshots - 1, 0)]  # (a, b, free, states held): as _revolve walks
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
    return recomputed, peak


class HeldStates:
    """Counts the bytes of recomputed states a reversal holds at once (``SolveStats.held_bytes``).

    ``hold(state)`` registers a state the reversal just recomputed; its bytes count until it is
    freed (a weak finaliser), so the peak is what was really alive, not what the schedule says.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def hold(self, state: Tensor) -> Tensor:
        nbytes = state.untyped_storage().nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(state, self._release, nbytes)
        return state

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


def describe(schedule: Schedule | Any) -> str:
    """``binomial, 4 snapshots`` / ``every step start``: for reprs and plan tables."""
    if schedule.snapshots is None:
        return "every step start"
    return f"{schedule.kind}, {schedule.snapshots} snapshots"
