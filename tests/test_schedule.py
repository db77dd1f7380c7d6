"""The checkpointing schedule is one object: what it predicts is what the reversal does.

For each schedule and three snapshot counts, eager and compiled, the states the forward pass
stores (``Solution.saved_bytes``), the recomputed states the reversal holds at once
(``SolveStats.held_bytes``) and the steps it recomputes equal ``Schedule``'s own figures; and
``Auto`` builds its Checkpoint with the schedule it costs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nde_zoo.strategies import Auto, Checkpoint, Direct
from nde_zoo.driver.programs import BACKEND_ENV
from nde_zoo.driver.schedule import Schedule

F64 = torch.float64
STEPS = 24
TS = torch.tensor([0.0, 0.25, 1.0], dtype=F64)  # 0.25 is on the grid of 24 steps


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def _run(strategy, field, y0):
    y0 = y0.clone().requires_grad_()
    sol = strategy.solve(field, y0, TS)
    stored = sol.saved_bytes
    grads = torch.autograd.grad(sol.ys.pow(2).sum(), [y0, *field.parameters()])
    return sol, stored, grads


@pytest.mark.parametrize("kind", ["uniform", "binomial"])
@pytest.mark.parametrize("snapshots", [2, 5, 9])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_schedule_predicts_what_the_reversal_holds(kind, snapshots, compiled, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    torch.manual_seed(0)
    field, y0 = Field(), torch.randn(4, 3, dtype=F64)
    strategy = Checkpoint("rk4", steps=STEPS, snapshots=snapshots, schedule=kind, compile="strict" if compiled else False)
    schedule = strategy.schedule_for(STEPS)
    assert schedule == Schedule(STEPS, snapshots, kind)
    sol, stored, grads = _run(strategy, field, y0)
    state = y0.nelement() * y0.element_size()
    assert stored // state == len(schedule.stored) <= snapshots
    assert (stored + sol.stats.held_bytes) // state == schedule.peak_states
    assert sol.stats.recomputed_steps == schedule.recomputed_steps
    _, _, reference = _run(Direct("rk4", steps=STEPS), field, y0)
    for got, want in zip(grads, reference, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_uniform_recomputes_each_step_at_most_once_and_binomial_keeps_fewer_states():
    for snapshots in (2, 5, 9):
        uniform, binomial = Schedule(100, snapshots, "uniform"), Schedule(100, snapshots, "binomial")
        assert uniform.recomputed_steps == 100 - len(uniform.stored) < binomial.recomputed_steps
        assert binomial.peak_states <= 2 * snapshots < uniform.peak_states


def test_every_step_start_when_snapshots_cover_the_steps():
    for kind in ("uniform", "binomial"):
        assert Schedule(8, 8, kind).stored == Schedule(8, None).stored == tuple(range(8))
        assert Schedule(8, 20, kind).recomputed_steps == 0 and Schedule(8, 20, kind).peak_states == 8


def test_a_schedule_name_is_checked():
    with pytest.raises(ValueError, match="schedule must be one of 'uniform', 'binomial'"):
        Checkpoint("rk4", steps=4, snapshots=2, schedule="revolve")


@pytest.mark.parametrize("compiled", [False, True])
def test_auto_builds_the_schedule_it_costs(compiled):
    auto = Auto("rk4", steps=STEPS, compile=compiled)
    label = "checkpoint+compile" if compiled else "checkpoint"
    built = auto._build(label, 4)
    assert built.schedule_for(STEPS) == Schedule(STEPS, 4, "uniform" if compiled else "binomial")


def test_a_misspelt_argument_names_the_class_and_what_it_takes():
    """Stepping is passed on as **stepping: a wrong argument still names the class the user called."""
    with pytest.raises(TypeError, match=r"Checkpoint got an unexpected argument 'snapshot'; it takes: solver, "
                                        r"snapshots, schedule, steps, step_size, rtol, atol, max_steps, compile"):
        Checkpoint("rk4", steps=4, snapshot=2)
    with pytest.raises(TypeError, match=r"Direct got an unexpected argument 'step'"):
        Direct(step=3)
