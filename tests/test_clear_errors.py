"""Errors name the real cause: an empty batch, NaN data or a NaN field under the adjoints.

Before: an empty batch gave ``MaxStepsExceeded ... reached only t=0`` (adaptive solves) or a raw
``max(): Expected reduction dim`` (reversible); NaN data under ``adjoint``/``seminorm`` gave
``StepSizeUnderflow ... the dynamics are stiff``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nde_zoo.solvers import NonFiniteStateError
from nde_zoo.strategies import Adjoint, Checkpoint, Direct, LocalERNODE, Reversible, Seminorm, Symplectic

STRATEGIES = {
    "direct_adaptive": lambda: Direct("dopri5"),
    "direct_fixed": lambda: Direct("rk4", steps=4),
    "checkpoint": lambda: Checkpoint("dopri5"),
    "symplectic": lambda: Symplectic("dopri5"),
    "reversible_fixed": lambda: Reversible("rk4", steps=4),
    "reversible_adaptive": lambda: Reversible("dopri5"),
    "adjoint": lambda: Adjoint("dopri5"),
    "seminorm": lambda: Seminorm("dopri5"),
    "adjoint_fixed": lambda: Adjoint("dopri5", steps=4),
    "ernode": lambda: LocalERNODE(inner=Direct("dopri5")),
}


def _field() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))


def _f(net):
    return lambda t, y: net(y)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_empty_batch_is_named(name):
    y0 = torch.randn(0, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"y0 has shape \(0, 4\): the batch is empty"):
        STRATEGIES[name]().solve(_f(_field()), y0, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("make", [Direct, Reversible], ids=["direct", "reversible"])
def test_empty_batch_of_an_sde_is_named(make):
    pytest.importorskip("torchsde")
    from nde_zoo.strategies.sde import brownian

    class ToySDE(nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return 0.1 * torch.ones_like(y)

    y0 = torch.randn(0, 2)
    with pytest.raises(ValueError, match="the batch is empty"):
        make(steps=4).solve_sde(
            ToySDE(), y0, torch.tensor([0.0, 1.0]), brownian(0.0, 1.0, torch.randn(1, 2), 0)
        )


@pytest.mark.parametrize(
    "make",
    [lambda: Adjoint("dopri5"), lambda: Seminorm("dopri5"), lambda: Adjoint("bosh3", steps=4)],
    ids=["adjoint", "seminorm", "adjoint_fixed"],
)
def test_nan_data_under_the_adjoints_names_the_data(make):
    y0 = torch.randn(8, 4)
    y0[3, 1] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"initial state y0 .* NaN or infinite .* index 3.*data"):
        make().solve(_f(_field()), y0, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    "make", [lambda: Adjoint("dopri5"), lambda: Seminorm("dopri5")], ids=["adjoint", "seminorm"]
)
def test_nan_field_under_the_adjoints_names_the_field(make):
    net = _field()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")  # what one diverged optimiser step leaves behind
    with pytest.raises(NonFiniteStateError, match="vector field returned NaN"):
        make().solve(_f(net), torch.randn(8, 4), torch.tensor([0.0, 1.0]))


def test_blow_up_on_a_fixed_grid_is_not_called_stiff():
    """dopri5 pinned to a fixed grid: a state overflowing is named as such, not as a stiff step underflow."""
    with pytest.raises(NonFiniteStateError, match="NaN or infinite on its fixed grid"):
        Adjoint("dopri5", steps=4).solve(
            lambda t, y: 1e3 * y**3, torch.full((2, 2), 10.0), torch.tensor([0.0, 1.0])
        )
