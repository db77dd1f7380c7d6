"""Checkpointing: exact gradients with a few stored states and one step's graph at a time.

Fixed steps follow a :class:`~nde_zoo.driver.schedule.Schedule`: ``"uniform"`` (the default;
segments of ``ceil(N / snapshots)`` steps, each recomputed once) or ``"binomial"`` (Griewank &
Walther, "Algorithm 799: Revolve", 2000: the fewest states for a bounded recomputation). Adaptive
steps use per-step checkpointing (ACA; Zhuang et al., "Adaptive Checkpoint Adjoint", ICML 2020):
the state at every accepted step start is kept, and each step is recomputed once with a graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from nde_zoo.solvers import ButcherTableau, rk_step
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution, takes_stepping
from nde_zoo.driver.loop import Scheme
from nde_zoo.strategies.plan import Cost, ProbeFit, snapshot_grid
from nde_zoo.driver.schedule import (
    SCHEDULES,
    Schedule,
    binomial_peak_states,
    binomial_recomputations,
    binomial_repetitions,
    binomial_split,
)

__all__ = ["Checkpoint", "binomial_split", "binomial_repetitions", "binomial_recomputations", "binomial_peak_states"]


class CheckpointScheme(Scheme):
    """The plain RK step, stored by a schedule, reversed one step's graph at a time."""

    keeps = "schedule"

    def reverse(self, ops: Any, t: Tensor, h: Any, t_first: Tensor, state: Tensor, bar: Tensor) -> Any:
        tableau = self.tableau
        _, ybar, pbars = ops.vjp(lambda f, y: rk_step(f, t, y, h, tableau).y, state, bar)
        return None, ybar, pbars


class Checkpoint(ODEStrategy):
    """Backprop one step at a time from stored states: exact, with memory you choose.

    Gradient: exact for the discretisation (equal to :class:`Direct` up to round-off).
    Memory: the states the forward pass stores plus the recomputed ones the reversal holds at once
    (``Schedule.peak_states``; ``solution.stats.held_bytes`` measures the held ones), plus one
    step's graph (``s`` stages). Time: the forward solve, the recomputation the schedule needs
    (``solution.stats.recomputed_steps`` after backward), and ``N`` steps with a graph.

    Args:
        solver, steps / step_size, rtol / atol / max_steps, compile: as :class:`ODEStrategy`.
        snapshots: stored states (the initial one included) for a fixed-step solve; ``None``
            keeps every step start (no recomputation), which is also what adaptive solves do
            (ACA), where ``snapshots`` must be ``None``.
        schedule: ``"uniform"`` (default: ``S + N/S`` states, each step recomputed once, one
            compiled program) or ``"binomial"`` (Revolve: about ``2 S`` states, more
            recomputation; compiled, its forward is a program and its reversal runs eagerly).
    """

    name = "checkpoint"
    compilable = True
    exact = True

    @takes_stepping
    def __init__(
        self, solver: str | ButcherTableau = "dopri5", *, snapshots: int | None = None, schedule: str = "uniform",
        **stepping: Any,
    ) -> None:
        super().__init__(solver, **stepping)
        if snapshots is not None:
            if self.stepping.adaptive:
                raise ValueError(
                    "snapshots= sets a checkpointing schedule for fixed steps; adaptive solves checkpoint every "
                    "accepted step (ACA): leave snapshots=None, or give steps=/step_size="
                )
            if int(snapshots) != snapshots or snapshots < 1:
                raise ValueError(f"snapshots must be a positive integer (y0 counts as one), got {snapshots!r}")
        if schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}: 'uniform' recomputes "
                f"each step once, 'binomial' (Revolve) keeps fewer states for more recomputation"
            )
        self.snapshots = None if snapshots is None else int(snapshots)
        self.schedule = schedule

    @classmethod
    def planned_schedule(cls, steps: int, snapshots: int | None, compiled: bool) -> Schedule:
        """Auto's Checkpoint: uniform compiled (one program), binomial eagerly (the fewest states
        for its recomputation, so the most budgets fit)."""
        return Schedule(steps, snapshots, "uniform" if compiled else "binomial")

    @classmethod
    def predict(cls, fit: ProbeFit, budget: int, compiled: bool) -> Cost:
        """Probed keeping every step start (``N`` states): with ``c`` snapshots the forward keeps
        ``N - stored(c)`` states less, the backward ``N - peak_states(c)`` less, and
        ``recomputed_steps(c)`` steps are run again, all read from the :class:`Schedule` the built
        strategy follows. Every step start when it fits (no recomputation); else the fastest count
        that fits, costed on a grid (neither the peak nor the recomputation is monotone in ``c``),
        or, when none fits, the smallest peak. Adaptive solves keep every step start (ACA)."""
        forward_peak, backward_peak, seconds = fit.grows("forward_peak"), fit.grows("backward_peak"), fit.seconds()
        every = Cost(max(forward_peak, backward_peak), seconds, detail="" if fit.adaptive else "every step start")
        if fit.adaptive or every.peak <= budget:
            return every
        n, size, per_step = fit.steps, fit.state_bytes, fit.seconds("forward") / fit.steps

        def cost(c: int) -> Cost:
            schedule = cls.planned_schedule(n, c, compiled)
            return Cost(max(forward_peak - size * max(0, n - len(schedule.stored)),
                            backward_peak - size * max(0, n - schedule.peak_states)),
                        seconds + per_step * schedule.recomputed_steps, snapshots=c)

        costs = [cost(c) for c in snapshot_grid(n)]
        fitting = [c for c in reversed(costs) if c.peak <= budget]  # of equally fast ones, the most snapshots
        return min(fitting, key=lambda c: c.seconds) if fitting else min(costs, key=lambda c: (c.peak, c.seconds))

    @classmethod
    def planned_arguments(cls, snapshots: int | None, compiled: bool) -> dict[str, Any]:
        arguments: dict[str, Any] = {"schedule": cls.planned_schedule(1, None, compiled).kind}
        if snapshots is not None:
            arguments["snapshots"] = snapshots
        return arguments

    def schedule_for(self, steps: int) -> Schedule:
        """The schedule a fixed-step solve of ``steps`` steps follows (what :class:`Auto` costs)."""
        return Schedule(steps, self.snapshots, self.schedule)

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        with SavedBytes() as saved:
            ys, stats, path = self.drive(CheckpointScheme(self.tableau), field, y0, ts, params,
                                          snapshots=self.snapshots, schedule_kind=self.schedule)
        return self._record(Solution(ys, ts, stats, path, saved_bytes=saved.nbytes))

    def __repr__(self) -> str:
        extra = f", compile={self.compile}" if self.compile.enabled else ""
        schedule = f", schedule={self.schedule!r}" if self.snapshots is not None else ""
        return (f"Checkpoint(solver={self.tableau.name!r}, {self.stepping.describe()}, "
                f"snapshots={self.snapshots}{schedule}{extra})")
