"""``Adjoint``/``Seminorm`` with ``steps=``/``step_size=`` take exactly those fixed steps.

torchdiffeq's adaptive methods (``adaptive_heun``, ``bosh3``, ``dopri5``) ignore ``step_size``
(with only a warning), so ``Adjoint("heun", steps=4)`` used to run adaptive at torchdiffeq's
default tolerances: 1546 evaluations instead of 8. Now the forward and the backward solve
step on the same grid as every other strategy (``solvers.stepping.fixed_grid``): uniform
steps over ``[ts[0], ts[-1]]`` with every output time landed on.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nde_zoo.strategies import Adjoint, Direct, Seminorm

#: (stages, FSAL) of each torchdiffeq-backed solver. Fixed-grid methods cost ``s`` per step;
#: the FSAL pairs (pinned to the grid) cost one first evaluation per solve and ``s - 1`` per step.
SOLVERS = {
    "euler": (1, False),
    "midpoint": (2, False),
    "rk38": (4, False),
    "heun": (2, False),
    "bosh3": (4, True),
    "dopri5": (7, True),
}


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, t, y):
        return self.net(y) * (1 + t)  # explicit time dependence: the grid's times matter


def _expected_nfe(solver: str, steps: int, solves: int) -> int:
    s, fsal = SOLVERS[solver]
    return solves + (s - 1) * steps if fsal else s * steps


@pytest.mark.parametrize("strategy_cls", [Adjoint, Seminorm])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("ts", [[0.0, 0.3, 1.0], [1.0, 0.3, 0.0]], ids=["forward", "reversed"])
def test_steps_mean_fixed_steps_forward_and_backward(strategy_cls, solver, ts):
    torch.manual_seed(0)
    field = Field().double()
    ts = torch.tensor(ts, dtype=torch.float64)
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Unexpected arguments.*")  # torchdiffeq ignoring options
        solution = strategy_cls(solver, steps=4).solve(field, y0, ts)
        solution.ys.square().sum().backward()
    # grid: 0, 0.25, 0.3 (an output time), 0.5, 0.75, 1: five steps over two output intervals
    assert solution.stats.nfe_forward == _expected_nfe(solver, 5, solves=1)
    assert solution.stats.nfe_backward == _expected_nfe(solver, 5, solves=2)
    # the very discretisation of the zoo's own solver core on the same grid
    reference = Direct(solver, steps=4).solve(field, y0.detach(), ts)
    torch.testing.assert_close(solution.ys, reference.ys, rtol=0, atol=1e-12)


def test_heun_with_four_steps_takes_eight_evaluations():
    """The issue's case: ``Adjoint("heun", steps=4)`` took 1546 evaluations instead of 8."""
    torch.manual_seed(0)
    y0 = torch.randn(8, 3, requires_grad=True)
    solution = Adjoint("heun", steps=4).solve(Field(), y0, torch.tensor([0.0, 1.0]))
    solution.ys[-1].sum().backward()
    assert (solution.stats.nfe_forward, solution.stats.nfe_backward) == (8, 8)


@pytest.mark.parametrize("solver", ["heun", "dopri5"])
def test_step_size_means_fixed_steps(solver):
    torch.manual_seed(0)
    field = Field().double()
    y0 = torch.randn(4, 3, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    solution = Adjoint(solver, step_size=0.3).solve(field, y0, ts)  # 0, 0.3, 0.6, 0.9, 1
    assert solution.stats.nfe_forward == _expected_nfe(solver, 4, solves=1)
    reference = Direct(solver, step_size=0.3).solve(field, y0, ts)
    torch.testing.assert_close(solution.ys, reference.ys, rtol=0, atol=1e-12)


def test_fixed_step_gradient_converges_to_direct():
    """The continuous adjoint on a fine fixed grid approaches backprop through the same solver."""
    torch.manual_seed(0)
    field = Field().double()
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def grad(strategy):
        loss = strategy.solve(field, y0, ts).ys.square().sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [y0, *field.parameters()])])

    reference = grad(Direct("dopri5", steps=64))
    error = (grad(Adjoint("dopri5", steps=64)) - reference).norm() / reference.norm()
    assert error < 1e-6
