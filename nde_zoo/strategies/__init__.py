"""Gradient strategies: how the gradient through a differential equation solve is computed."""

from nde_zoo.strategies.base import GradientStrategy, ODEStrategy, Solution
from nde_zoo.strategies.direct import Direct
from nde_zoo.strategies.reversible import Reversible
from nde_zoo.strategies.symplectic import Symplectic

__all__ = ["Direct", "GradientStrategy", "ODEStrategy", "Reversible", "Solution", "Symplectic"]
