"""Direct backpropagation through the solver's operations (the baseline)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from nde_zoo.solvers import odeint
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution
from nde_zoo.strategies.sde import solve_sde

__all__ = ["Direct"]


class Direct(ODEStrategy):
    """Backpropagate through every operation of the solve ("discretise-then-optimise").

    Gradient: exact for the discretisation. Memory: the whole graph, ``N s L`` for ``N``
    steps of ``s`` stages with a field graph of size ``L``. The reference every exact
    strategy is tested against. Step sizes carry no gradient.
    """

    name = "direct"
    kinds = frozenset({"ode", "sde"})

    def solve(self, field: Any, y0: Tensor, ts: Tensor) -> Solution:
        with SavedBytes() as saved:
            ys, path, stats = odeint(field, y0, ts, self.tableau, self.stepping)
        return self._record(Solution(ys, ts, stats, path, saved_bytes=saved.nbytes))

    def solve_sde(self, sde: Any, y0: Tensor, ts: Tensor, bm: Any, dt: float | None = None) -> Solution:
        """An SDE by backprop through ``torchsde.sdeint`` (see :mod:`nde_zoo.strategies.sde`)."""
        return solve_sde(self, sde, y0, ts, bm, route="direct", dt=dt)
