"""Errors raised by the solver core. Each message names what went wrong and a fix."""

from __future__ import annotations

__all__ = ["SolverError", "MaxStepsExceeded", "StepSizeUnderflow", "NonFiniteStateError"]


class SolverError(RuntimeError):
    """Base class of every runtime failure of a solve."""


class MaxStepsExceeded(SolverError):
    """An adaptive solve used up ``max_steps`` before reaching the last output time."""


class StepSizeUnderflow(SolverError):
    """The adaptive controller shrank the step below what the dtype can resolve."""


class NonFiniteStateError(SolverError, FloatingPointError):
    """The state became NaN or infinite."""
