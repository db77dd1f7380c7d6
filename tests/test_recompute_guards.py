"""Strategies that recompute the field refuse a non-deterministic one; the reversible solve
warns when its coupled states drift apart (an unstable solve), also without a backward pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nde_zoo.strategies import Checkpoint, Direct, Reversible, Symplectic
from nde_zoo.driver.autograd import NonDeterministicFieldError

F64 = torch.float64
RECOMPUTING = {"checkpoint": Checkpoint, "symplectic": Symplectic, "reversible": Reversible}


class DropoutField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()

    def forward(self, t, y):
        return self.net(y)


class NoisyField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()

    def forward(self, t, y):
        return self.lin(y) + 0.1 * torch.randn_like(y)


@pytest.mark.parametrize("name", sorted(RECOMPUTING))
@pytest.mark.parametrize("field_cls, match", [(DropoutField, "dropout in training mode"),
                                              (NoisyField, "two evaluations at the same")])
def test_non_deterministic_field_is_refused_by_name(name, field_cls, match):
    field = field_cls()
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(NonDeterministicFieldError, match=f"non-deterministic: {match}"):
        RECOMPUTING[name]("rk4", steps=5).solve(field, y0, ts)


def test_deterministic_uses_pass():
    """Dropout in eval mode, inference without gradients, and Direct (no recomputation) are fine."""
    field = DropoutField()
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    Direct("rk4", steps=5).solve(field, y0, ts)
    with torch.no_grad():
        Symplectic("rk4", steps=5).solve(field, y0, ts)
    field.eval()
    Symplectic("rk4", steps=5).solve(field, y0, ts).ys.sum().backward()


@pytest.mark.parametrize("rate, span, steps", [(1e6, 1e-4, 40), (20.0, 1.0, 5)])
def test_unstable_reversible_solve_warns_without_a_backward(rate, span, steps):
    """The issue's cases: dy/dt = -k y where Direct gives ~0 and the reversible scheme blows up."""
    y0 = torch.ones(2, 1, dtype=F64)
    ts = torch.tensor([0.0, span], dtype=F64)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="unstable.*drifted apart.*step size.*coupling") :
        sol = Reversible("rk4", steps=steps).solve(lambda t, y: -rate * y, y0, ts)
    assert sol.extras["drift"] > 0.1


def test_stable_reversible_solve_is_quiet():
    y0 = torch.ones(2, 1, dtype=F64)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = Reversible("rk4", steps=10).solve(lambda t, y: -y, y0, ts)
    assert sol.extras["drift"] < 1e-6


def test_a_field_that_takes_its_own_derivatives_does_not_leak():
    """The identity hooks that shadow SavedBytes during a forward solve packed saved outputs as
    themselves: a CNF field with tanh (which saves its output) then kept each solve's graphs in an
    uncollectable cycle, +146 MB per 20 training steps. Count the live autograd graphs instead.

    Everything alive before the test is frozen out of the collector first (``gc.freeze``): late in a
    test worker the heap holds millions of objects, and scanning them twelve times took 25 s; a leaked
    graph is made of objects this test creates, which the count still sees."""
    import gc

    from nde_zoo.models.cnf import CNF

    gc.collect()
    gc.freeze()
    try:
        for strategy in (Reversible("rk4", steps=2), Symplectic("rk4", steps=2), Checkpoint("rk4", steps=2)):
            model = CNF(strategy, width=8, depth=1, architecture="concatsquash", activation="tanh")
            x = torch.randn(16, 2)
            counts = []
            for _ in range(4):
                (-model(x).mean()).backward()
                gc.collect()
                counts.append(sum(1 for o in gc.get_objects()
                                  if isinstance(o, torch.Tensor) and o.grad_fn is not None))
            assert counts[-1] <= counts[1], (type(strategy).__name__, counts)
    finally:
        gc.unfreeze()
