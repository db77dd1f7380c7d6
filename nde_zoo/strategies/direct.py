"""Direct backpropagation through the solver's operations (the baseline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from nde_zoo.solvers import (
    CountedField,
    SolveStats,
    check_finite_outputs,
    check_inputs,
    fixed_path,
    odeint,
    rk_stepper,
)
from nde_zoo.strategies._compiled import Grid, scan_forward
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
    compilable = True

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        # params= is not needed: autograd records every tensor the field reads, wherever it lives.
        with SavedBytes() as saved:
            compiled = self._solve_compiled(field, y0, ts) if self._compiles() else None
            if compiled is None:
                ys, path, stats = odeint(field, y0, ts, self.tableau, self.stepping,
                                         step_factory=self._compiled_rk_step(field))
            else:
                ys, path, stats = compiled
        return self._record(Solution(ys, ts, stats, path, saved_bytes=saved.nbytes))

    def _solve_compiled(self, field: Any, y0: Tensor, ts: Tensor):
        """The fixed-step loop as one compiled scan, differentiated by autograd through the scan.

        Returns what :func:`~nde_zoo.solvers.odeint` returns, or ``None`` if it fell back to eager.
        """
        times = check_inputs(y0, ts)
        path = fixed_path(times, self.stepping)
        grid = Grid.of(path.times, path.sizes, path.output_steps, y0)
        tableau, layout = self.tableau, grid.layout

        def build() -> Callable[..., Any]:
            def program(field: Any, y0: Tensor, times: Tensor, sizes: Tensor, index: Tensor) -> Tensor:
                step = rk_stepper(field, tableau)  # the eager loop's step
                k1 = field(times[0], y0) if tableau.fsal else None  # the first step's stage, as rk_step takes it
                return scan_forward(step, y0, k1, lambda y: y, times, sizes, layout, index, nested=False)[0]

            return program

        # grad mode is part of the key: training and inference are different programs
        key = self.programs.key("direct", field, [y0], (tableau.name, layout, torch.is_grad_enabled()))
        if self.programs.first_call(key):
            CountedField(field)(ts[0], y0)  # shape check, as the eager loop's
        ys = self.programs.run(key, build, field, y0, grid.times, grid.sizes, grid.output_index)
        if ys is None:
            return None
        check_finite_outputs(ys, times, field)
        nfe = (tableau.stages - 1) * grid.steps + 1 if tableau.fsal else tableau.stages * grid.steps
        return ys, path, SolveStats(nfe_forward=nfe if grid.steps else 0, accepted_steps=grid.steps)

    def solve_sde(self, sde: Any, y0: Tensor, ts: Tensor, bm: Any, dt: float | None = None) -> Solution:
        """An SDE by backprop through ``torchsde.sdeint`` (see :mod:`nde_zoo.strategies.sde`)."""
        return solve_sde(self, sde, y0, ts, bm, route="direct", dt=dt)
