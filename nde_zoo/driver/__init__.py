"""The solve driver: one loop that every RK-based strategy runs, eagerly or compiled.

The layer between :mod:`nde_zoo.solvers` (numerics: one RK step, the stepping loop) and
:mod:`nde_zoo.strategies` (how a gradient is computed). A strategy declares a :class:`Scheme`
(its forward step, what it keeps, its reverse step); the driver owns everything else:

- ``loop.py``: :func:`solve`, the forward and backward passes as Python loops or compiled scans,
  the grid, the output positions, the NFE, the finite checks, the fall-back to eager;
- ``schedule.py``: checkpointing schedules (which step starts are stored, how many states are
  alive, how many steps are recomputed), read by the reversal, the compiled program and ``Auto``;
- ``programs.py``: the cache of compiled programs, their keys and the reasons a solve runs eagerly;
- ``traced_field.py``: a field Dynamo cannot compile traced into a pure graph, or the line named;
- ``fields.py``: what a field reads (its parameters, found in closures too) and whether it can be
  recomputed exactly;
- ``autograd.py``: pieces shared by the custom backward passes.

It imports nothing from :mod:`nde_zoo.strategies` (which imports it).
"""

from nde_zoo.driver.loop import Forward, Grid, Run, Scheme, add_grads, solve
from nde_zoo.driver.schedule import SCHEDULES, Schedule

__all__ = ["SCHEDULES", "Forward", "Grid", "Run", "Schedule", "Scheme", "add_grads", "solve"]
