"""Adjoint and Seminorm explain a field's wrong output shape as every other strategy does (they
used to give raw broadcasting errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nde_zoo.strategies import Adjoint, Direct, Reversible, Seminorm


class _WrongShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)  # returns 2 channels for a 3-channel state

    def forward(self, t, y):
        return self.linear(y)


def _message(strategy) -> str:
    with pytest.raises(ValueError) as info:
        strategy.solve(_WrongShape(), torch.randn(4, 3), torch.tensor([0.0, 1.0]))
    return str(info.value)


@pytest.mark.parametrize("strategy", [Adjoint(), Seminorm(), Adjoint("midpoint", steps=2)], ids=["adjoint", "seminorm",
                                                                                              "adjoint-fixed"])
def test_adjoint_shape_errors_match_the_other_strategies(strategy):
    message = _message(strategy)
    assert message == _message(Direct()) == _message(Reversible("rk4", steps=2))
    assert "the vector field returned shape (4, 2)" in message and "dimension 1: field gives 2, state has 3" in message
