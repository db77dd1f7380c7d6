"""nde_zoo: neural differential equations with pluggable gradient strategies."""

import time as _time

#: when nde_zoo was first imported (``time.perf_counter``): the start of a ``python -m nde_zoo``
#: command, up to the interpreter's own start-up. The first training step is timed from it.
STARTED = _time.perf_counter()

__version__ = "0.1.0"
