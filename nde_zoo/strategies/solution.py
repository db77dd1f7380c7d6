"""What a solve returns (:class:`Solution`), and the record a training step keeps of it."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from torch import Tensor

from nde_zoo.solvers import Path, SolveStats

__all__ = ["Solution"]


@dataclass
class Solution:
    """The result of a solve.

    Attributes:
        ys: the state at each output time, shape ``(len(ts), batch, *state)``.
        ts: the output times, shape ``(len(ts),)``.
        stats: forward NFE, accepted/rejected steps; ``nfe_backward`` is filled in by
            ``backward()``; ``saved_bytes`` is what autograd keeps alive for backward.
        path: the accepted step times (plain floats), when the strategy ran our solver core.
    """

    ys: Tensor
    ts: Tensor
    stats: SolveStats
    path: Path | None = None
    saved_bytes: int = 0
    extras: dict[str, Any] = dataclass_field(default_factory=dict)


@dataclass(frozen=True)
class _Record:
    """What a training step's figures need from one solve: never its tensors or its graph.

    ``stats`` and ``extras`` are the solution's own objects, because its backward pass fills
    them in later (``nfe_backward``, the reversible reconstruction error).
    """

    stats: SolveStats
    saved_bytes: int
    extras: dict[str, Any]
