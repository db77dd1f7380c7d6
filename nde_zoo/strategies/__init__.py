"""Gradient strategies: how the gradient through a differential equation solve is computed."""

from nde_zoo.strategies.adjoint import Adjoint, Seminorm
from nde_zoo.strategies.auto import Auto, MemoryBudgetError
from nde_zoo.strategies.base import GradientStrategy, ODEStrategy, Solution
from nde_zoo.strategies.checkpoint import Checkpoint
from nde_zoo.strategies.direct import Direct
from nde_zoo.strategies.ernode import LocalERNODE
from nde_zoo.strategies.reversible import Reversible
from nde_zoo.strategies.symplectic import Symplectic

__all__ = [
    "Adjoint",
    "Auto",
    "Checkpoint",
    "Direct",
    "GradientStrategy",
    "LocalERNODE",
    "MemoryBudgetError",
    "ODEStrategy",
    "Reversible",
    "Seminorm",
    "Solution",
    "Symplectic",
]
