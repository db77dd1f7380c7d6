"""Gradient strategies: how the gradient through a differential equation solve is computed."""

import importlib as _importlib
import sys as _sys

from nde_zoo.strategies.adjoint import Adjoint, Seminorm
from nde_zoo.strategies.auto import Auto, MemoryBudgetError
from nde_zoo.strategies.base import GradientStrategy, ODEStrategy, Solution
from nde_zoo.strategies.checkpoint import Checkpoint
from nde_zoo.strategies.direct import Direct
from nde_zoo.strategies.ernode import LocalERNODE
from nde_zoo.strategies.reversible import Reversible
from nde_zoo.strategies.symplectic import Symplectic

# The driver's modules lived here before the driver became its own layer (nde_zoo.driver): their old
# import paths, and objects pickled under them (a strategy's Programs, a Schedule), keep resolving.
_MOVED = {"_autograd": "autograd", "_compiled": "programs", "fields": "fields", "schedule": "schedule",
          "traced_field": "traced_field"}
for _old, _new in _MOVED.items():
    _sys.modules[f"{__name__}.{_old}"] = globals()[_old] = _importlib.import_module(f"nde_zoo.driver.{_new}")

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
