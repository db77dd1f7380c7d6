"""Auto asks each strategy for its memory and time model; it knows none of its own."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from torch import nn

from nde_zoo.strategies import Auto, Direct
from nde_zoo.strategies import auto as auto_module
from nde_zoo.strategies.plan import Cost


class HalvedDirect(Direct):
    """Direct under another name, whose own model claims half of Direct's peak memory."""

    name = "halved_direct_for_tests"

    @classmethod
    def predict(cls, fit, budget, compiled):  # type: ignore[no-untyped-def]
        cost = super().predict(fit, budget, compiled)
        return Cost(cost.peak / 2, cost.seconds, detail="its own model")


class _Field(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    field = _Field(nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 8)).double())
    return field, torch.randn(32, 8, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64)


def test_a_strategy_of_yours_is_a_candidate_and_auto_uses_its_own_model():
    field, y0, ts = _problem()
    auto = Auto("rk4", steps=16, candidates=["direct", HalvedDirect.name], memory_budget="1TB")
    rows = {row.label: row for row in auto.measure(field, y0, ts).rows}
    assert rows[HalvedDirect.name].detail == "its own model"
    # the same solve measured twice, one of them halved by its class: about half
    assert 0.35 < rows[HalvedDirect.name].peak_bytes / rows["direct"].peak_bytes < 0.65, rows
    # a budget between the two: only the one whose model says it fits is chosen
    budget = int((rows[HalvedDirect.name].peak_bytes + rows["direct"].peak_bytes) / 2)
    auto = Auto("rk4", steps=16, candidates=["direct", HalvedDirect.name], memory_budget=budget)
    plan = auto.measure(field, y0, ts)
    assert plan.choice == HalvedDirect.name, plan.markdown()
    assert "halved_direct_for_tests (its own model)" in plan.markdown()


def test_an_inexact_strategy_is_refused_as_a_candidate_naming_the_exact_ones():
    with pytest.raises(ValueError, match=r"unknown candidate\(s\) seminorm.*direct, checkpoint, symplectic, "
                                         r"reversible.*the exact strategies"):
        Auto("rk4", steps=4, candidates=["seminorm"])


def test_auto_names_no_strategy_class_and_branches_on_no_strategy_name():
    tree = ast.parse(inspect.getsource(auto_module))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"Direct", "Checkpoint", "Symplectic", "Reversible"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            assert not set(constants) & set(auto_module.CANDIDATES), ast.unparse(node)


def test_an_unknown_strategy_name_is_refused_naming_the_known_ones():
    from nde_zoo.strategies.base import strategy_class

    with pytest.raises(ValueError, match=r"no ODE strategy is named 'revesible'; known: .*reversible"):
        strategy_class("revesible")


def test_seminorm_refuses_another_norm_naming_adjoint():
    from nde_zoo.strategies import Seminorm

    with pytest.raises(TypeError, match=r"Seminorm fixes adjoint_norm='seminorm'.*Adjoint\(adjoint_norm=\.\.\.\)"):
        Seminorm("dopri5", adjoint_norm="rms")
