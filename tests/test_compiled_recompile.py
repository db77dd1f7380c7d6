"""A compiled program that torch compiles again (its guards fail: a field whose submodule was
swapped) counts as a compile: ``programs.compiles`` and ``compile/seconds`` include it."""

from __future__ import annotations

import torch
from torch import nn

from nde_zoo.strategies import Direct


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, t, y):
        return self.net(y)


def test_a_recompile_after_swapping_a_submodule_is_counted_and_timed(monkeypatch):
    monkeypatch.setenv("NDE_ZOO_COMPILE_BACKEND", "eager")  # Dynamo's guards, without Inductor's minutes
    torch._dynamo.reset()
    torch.manual_seed(0)
    field, y0, ts = Field(), torch.randn(4, 2), torch.tensor([0.0, 1.0])
    strategy = Direct("rk4", steps=4, compile=True)
    programs = strategy.programs
    strategy.solve(field, y0, ts).ys.sum().backward()
    assert programs.compiles == 1 and not programs.fallbacks
    first = programs.compile_seconds
    strategy.solve(field, y0, ts).ys.sum().backward()
    assert programs.compiles == 1 and programs.compile_seconds == first  # a cached call compiles nothing

    field.net[1] = nn.ReLU()  # another submodule: the program's guards fail, torch compiles it again
    ys = strategy.solve(field, y0, ts).ys
    assert torch.allclose(ys, Direct("rk4", steps=4).solve(field, y0, ts).ys)  # the new field's solve
    assert programs.compiles == 2 and programs.compile_seconds > first
    assert programs.pending_seconds == programs.compile_seconds  # what compile/seconds logs next
    strategy.solve(field, y0, ts)
    assert programs.compiles == 2
