"""Where the driver was: a strategy written as ``from nde_zoo.strategies.driver import Scheme`` keeps working.

The driver is its own layer now, :mod:`nde_zoo.driver`; import from there.
"""

from nde_zoo.driver.loop import Forward, Grid, Run, Scheme, add_grads, row, scan_forward, solve

__all__ = ["Forward", "Grid", "Run", "Scheme", "add_grads", "row", "scan_forward", "solve"]
