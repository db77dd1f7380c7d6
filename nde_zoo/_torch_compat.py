"""Every private PyTorch API nde_zoo uses, in one place, each with its public alternative.

A private name can move between torch releases; collecting them here means one file to read
when torch is upgraded, and ``tests/test_torch_compat.py`` checks each one on the installed torch
(the compiled path's tested range is ``TESTED_TORCH`` in :mod:`nde_zoo.driver.programs`).
Nothing here changes torch's global state when imported: :func:`compile_limits` patches
Dynamo's recompile limits only around our own compiled calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["DropoutBase", "cache_scan_graphs", "compile_limits", "graphs_compiled", "profiler_memory_events",
           "profiler_running", "scan", "suspended_saved_tensors_hooks"]

# ``torch._higher_order_ops.scan``: the compiled solves' loop. Public alternative:
# ``torch.while_loop`` with preallocated output buffers; on the CPU its functional buffer
# updates copy the whole buffer each iteration (measured 5-100x slower than scan on the white
# dwarf), so scan it is. Older torch has none: compiling then falls back to eager, saying so.
try:
    from torch._higher_order_ops import scan
except ImportError:  # pragma: no cover - torch < 2.6
    scan = None  # type: ignore[assignment]


def cache_scan_graphs() -> bool:
    """Let Inductor's FX graph cache and AOTAutograd's cache keep graphs holding a ``scan``; whether
    they may (``False`` where this torch has no such switch).

    torch refuses to cache a graph holding a higher-order operator not marked cacheable ("Can't cache
    HigherOrderOperator: scan"), and every compiled solve is such a graph, so each new process traced,
    derived and generated its programs again (only the C++ compile was cached). ``scan``'s body is a
    graph module inside the graph, so the cache key (the pickled graph, its submodules included) covers
    it. The mark is ``torch._inductor.config.unsafe_marked_cacheable_functions``, process-wide, set at
    our first compile (not at import): the backward of a compiled Direct solve is compiled lazily, by
    the user's ``backward()``, outside any scope of ours. Its value (the torch version) enters every key.
    Public alternative: none; ``torch._inductor.config.fx_graph_cache = False`` turns the caches off."""
    from torch._higher_order_ops.scan import scan_op
    from torch._inductor import config

    marked = getattr(config, "unsafe_marked_cacheable_functions", None)
    if not isinstance(marked, dict):  # pragma: no cover - a torch without the switch
        return False
    marked.setdefault(f"{scan_op.__module__}.{scan_op.__name__}", f"nde_zoo/scan/{torch.__version__}")
    return True


#: The base class of every dropout module (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``...).
#: Public alternative: listing the public classes, which misses a future one.
DropoutBase = nn.modules.dropout._DropoutNd

#: Our programs' recompile limits. Every strategy instance compiles its own programs (one per
#: field, shape, solver and grid) and Dynamo counts recompiles per code object, so the default
#: limit (8) would fall back to eager in a sweep; our own cache (``Programs``) bounds and counts
#: what is compiled.
RECOMPILE_LIMIT = 256
ACCUMULATED_RECOMPILE_LIMIT = 4096


@contextlib.contextmanager
def compile_limits() -> Iterator[None]:
    """Raise Dynamo's recompile limits for the calls of our compiled programs only.

    ``torch._dynamo.config`` (private; public alternative: none for these limits). A scope, not an
    assignment at import: importing nde_zoo must not change ``torch.compile`` for the rest of the
    process. Limits a user set higher are kept.
    """
    import torch._dynamo

    config = torch._dynamo.config
    before = config.recompile_limit, config.accumulated_recompile_limit
    # set and restored by hand: ``config.patch`` cost 0.1 ms a call, twice a compiled training step
    config.recompile_limit = max(before[0], RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(before[1], ACCUMULATED_RECOMPILE_LIMIT)
    try:
        yield
    finally:
        config.recompile_limit, config.accumulated_recompile_limit = before


@contextlib.contextmanager
def suspended_saved_tensors_hooks() -> Iterator[None]:
    """Lift every saved-tensors hook for the block, then restore them in order.

    ``torch.func`` transforms refuse to trace under such hooks, and the strategies count saved
    bytes with them. ``torch._C._autograd`` (private; public alternative: none, there is no
    public way to suspend the hook stack, only ``torch.autograd.graph.disable_saved_tensors_hooks``
    which makes registering one an error rather than lifting those in place).
    """
    autograd = torch._C._autograd
    lifted = []
    while (top := autograd._top_saved_tensors_default_hooks(True)) is not None:
        lifted.append(top)
        autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(lifted):
            autograd._push_saved_tensors_default_hooks(pack, unpack)


def profiler_memory_events(profiler: Any, prefix: str) -> tuple[list[tuple[int, int]], dict[str, list[tuple[int, int]]]]:
    """The CPU allocator's events of a stopped ``torch.profiler.profile(profile_memory=True)``:
    ``[(time ns, +allocated / -freed bytes)]`` in time order, and the intervals of the
    ``record_function`` blocks named ``prefix + name``, by name.

    ``profiler.profiler.kineto_results`` and ``torch._C._autograd.DeviceType`` (private; public
    alternative: ``profiler.events()``, whose memory events carry no timestamps to order them by,
    or ``export_memory_timeline``, which writes a file and has no CPU allocator timeline).
    """
    cpu = torch._C._autograd.DeviceType.CPU
    events: list[tuple[int, int]] = []
    phases: dict[str, list[tuple[int, int]]] = {}
    for event in profiler.profiler.kineto_results.events():
        name = event.name()
        if name == "[memory]":
            if event.device_type() == cpu:
                events.append((event.start_ns(), event.nbytes()))
        elif name.startswith(prefix):
            phases.setdefault(name[len(prefix):], []).append((event.start_ns(), event.end_ns()))
    events.sort(key=lambda e: e[0])
    return events, phases


def graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process: a change across a call of a compiled
    program means that call compiled again. ``torch._dynamo.utils.counters`` (private; public
    alternative: none that counts recompiles; ``torch._logging`` can only print them)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError, AttributeError):
        return 0


def profiler_running() -> bool:
    """Whether a ``torch.profiler`` is already running in this process (a second cannot start).
    ``torch.autograd.profiler._is_profiler_enabled`` (private; public alternative: none, starting
    one and catching its error, which prints to stderr)."""
    from torch.autograd import profiler

    return bool(profiler._is_profiler_enabled)
