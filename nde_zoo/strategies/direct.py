"""Direct backpropagation through the solver's operations (the baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution
from nde_zoo.driver.loop import Scheme
from nde_zoo.strategies.sde import solve_sde

__all__ = ["Direct"]


class Direct(ODEStrategy):
    """Backpropagate through every operation of the solve ("discretise-then-optimise").

    Gradient: exact for the discretisation. Memory: the whole graph, ``N s L`` for ``N``
    steps of ``s`` stages with a field graph of size ``L``. The reference every exact
    strategy is tested against. Step sizes carry no gradient. Compiled: the fixed-step loop is
    one scan differentiated by autograd.
    """

    name = "direct"
    kinds = frozenset({"ode", "sde"})
    compilable = True
    exact = True

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        # params= is not needed: autograd records every tensor the field reads, wherever it lives.
        with SavedBytes() as saved:
            ys, stats, path = self.drive(Scheme(self.tableau), field, y0, ts)
        return self._record(Solution(ys, ts, stats, path, saved_bytes=saved.nbytes))

    def solve_sde(self, sde: Any, y0: Tensor, ts: Tensor, bm: Any, dt: float | None = None) -> Solution:
        """An SDE by backprop through ``torchsde.sdeint`` (see :mod:`nde_zoo.strategies.sde`)."""
        return solve_sde(self, sde, y0, ts, bm, route="direct", dt=dt)
