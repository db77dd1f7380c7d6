"""A new gradient strategy written against the solve driver: no loop of its own.

``StepwiseHeun`` declares the three things a strategy tells the driver
(``nde_zoo.driver``, docs/extending.md "A strategy on the driver"):

- its forward step: Heun's method, written out here (it could be any step function);
- what it keeps for backward: every step start (``keeps = "every"``);
- its reverse step: the vector-Jacobian product of one step, taken through ``ops.vjp``, which
  is autograd's eagerly and ``torch.func.vjp`` inside a compiled program.

The driver runs it eagerly (a Python loop) or compiled (``compile=True``: one scan forward, one
reverse scan backward); grids, outputs, finite checks, NFE and the fall-back are the driver's.
Its gradient equals ``Direct("heun", steps=N)``'s: the same discretisation.
Run: ``python examples/extending/driver_strategy.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nde_zoo.strategies import Direct
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution
from nde_zoo.driver import Scheme


def heun_step(field: Any, t: Tensor, y: Tensor, h: Any) -> Tensor:
    """One step of Heun's method (the explicit trapezoidal rule); ``h`` a float or a 0-d tensor."""
    k1 = field(t, y)
    k2 = field(t + h, y + h * k1)
    return y + (h / 2) * (k1 + k2)


class StepwiseHeunScheme(Scheme):
    """Heun's step; every step start kept; each step reversed with its own small graph."""

    keeps = "every"

    def step(self, field: Any) -> Any:
        # the driver's step contract: (t, state, h, carry) -> (state, error estimate or None, carry)
        return lambda t, y, h, carry: (heun_step(field, t, y, h), None, None)

    def first_carry(self, field: Any, t0: Tensor, state0: Tensor) -> None:
        return None  # nothing reused from one step to the next

    def step_evaluations(self, carry: Any) -> int:
        return 2

    def forward_nfe(self, steps: int) -> int:
        return 2 * steps

    def reverse(self, ops: Any, t: Tensor, h: Any, t_first: Tensor, state: Tensor, bar: Tensor) -> Any:
        # state: the step's start; bar: the cotangent after the step. Returns the state before it
        # (None: the driver has it stored), the cotangent before it, and the parameters' share.
        _, ybar, pbars = ops.vjp(lambda f, y: heun_step(f, t, y, h), state, bar)
        return None, ybar, pbars

    def backward_nfe(self, steps: int) -> int:
        return 2 * steps


class StepwiseHeun(ODEStrategy):
    """Heun's method at fixed steps, backpropagated one step at a time from stored step starts.

    Gradient: exact for the discretisation (``Direct("heun")``'s). Memory: ``N`` states and one
    step's graph. ``compile=True`` runs it as compiled scans.
    """

    name = "stepwise_heun"
    compilable = True

    def __init__(self, *, steps: int = 8, compile: bool | str = False) -> None:
        super().__init__("heun", steps=steps, compile=compile)  # the tableau names the order; the step is ours

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        with SavedBytes() as saved:
            # the driver checks the inputs and finds the tensors the field reads (closures too)
            ys, stats, path = self.drive(StepwiseHeunScheme(self.tableau), field, y0, ts, params)
        return self._record(Solution(ys, ts, stats, path, saved_bytes=saved.nbytes))


def gradients(strategy: ODEStrategy, field: nn.Module, y0: Tensor, ts: Tensor) -> list[Tensor]:
    y0 = y0.clone().requires_grad_()
    ys = strategy.solve(field, y0, ts).ys
    return list(torch.autograd.grad(ys.pow(2).sum(), [y0, *field.parameters()]))


def main(compile: bool | str = False) -> float:
    torch.manual_seed(0)

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, t: Tensor, y: Tensor) -> Tensor:
            return self.net(y) * torch.cos(t)

    field = Field().double()
    y0 = torch.randn(5, 3, dtype=torch.float64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    got = gradients(StepwiseHeun(steps=8, compile=compile), field, y0, ts)
    want = gradients(Direct("heun", steps=8), field, y0, ts)
    error = max(float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))
    print(f"StepwiseHeun (compile={compile}) against Direct('heun', steps=8), float64: relative error {error:.1e}")
    return error


if __name__ == "__main__":
    main()
    main(compile=True)
