"""How nde_zoo measures memory: what autograd keeps for backward, and what the allocator holds.

- :class:`SavedBytes`: the bytes autograd saves for backward inside a block (each storage once);
  every strategy reports it as ``Solution.saved_bytes`` (the ``memory/saved_bytes`` metric).
- :class:`LiveSaved`: the most of those bytes alive at once (a backward pass that frees as it goes).
- :class:`AllocatorPeak`: the most the CPU allocator held at once, from the profiler's memory
  events: what :class:`~nde_zoo.strategies.Auto` budgets on the CPU, and what a user checks.
- :func:`measure_solve`: one solve's forward and backward, its peaks and seconds (Auto's probe).
- :func:`parse_bytes` / :func:`format_bytes` / :func:`available_memory`: budgets as users write them.

On a GPU the figures are CUDA's own (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from nde_zoo._torch_compat import profiler_memory_events, profiler_running

__all__ = ["SavedBytes", "LiveSaved", "AllocatorPeak", "Probe", "measure_solve", "parse_bytes", "format_bytes",
           "available_memory"]

log = logging.getLogger("nde_zoo")

class SavedBytes:
    """Counts the bytes autograd saves for backward inside a ``with`` block.

    Uses ``torch.autograd.graph.saved_tensors_hooks``; storages are counted once each,
    however many operations save them (a weight used by every step counts once).
    """

    def __init__(self) -> None:
        self._saved: list[weakref.ref[Tensor]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, tensor: Tensor) -> Tensor:
        # Detached (same storage; autograd restores the graph edge on unpack): returning the tensor
        # itself would make a saved *output* hold its own grad_fn, a reference cycle that Python's
        # collector cannot see, so a solve whose backward never ran kept its whole graph.
        packed = tensor.detach()
        self._saved.append(weakref.ref(packed))
        return packed

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages still kept for backward. What a graph saved and freed
        during the block (a field's own inner graph) does not count, and a freed address reused by
        a later storage is not confused with it (counting by address alone was flaky)."""
        storages: dict[int, int] = {}
        for ref in self._saved:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class LiveSaved:
    """Peak bytes of storages autograd holds for backward *at once*, each storage counted once.

    The parameters' storages (``ignore``) are left out: they exist whether or not a graph does.
    """

    def __init__(self, ignore: list[Tensor]) -> None:
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [references held, bytes]
        self.live = 0
        self.peak = 0
        ignored = {t.untyped_storage().data_ptr() for t in ignore}
        outer = self

        class Held:
            def __init__(self, tensor: Tensor) -> None:
                # A detached alias: same storage, but no strong reference back to an output's
                # grad_fn (that cycle would keep the graph alive and inflate the count).
                self.tensor = tensor.detach()
                storage = tensor.untyped_storage()
                self.ptr = None if storage.data_ptr() in ignored else storage.data_ptr()
                if self.ptr is not None:
                    entry = outer.refs.setdefault(self.ptr, [0, storage.nbytes()])
                    if entry[0] == 0:
                        outer.live += entry[1]
                        outer.peak = max(outer.peak, outer.live)
                    entry[0] += 1

            def __del__(self) -> None:
                if self.ptr is not None:
                    entry = outer.refs[self.ptr]
                    entry[0] -= 1
                    if entry[0] == 0:
                        outer.live -= entry[1]
                        del outer.refs[self.ptr]

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor)

    @staticmethod
    def kept_by(outputs: Tensor) -> list[Tensor]:
        """The tensors the custom autograd Functions in ``outputs``' graph saved for backward.

        A strategy's backward rebuilds step graphs from the states it saved (a recomputed step
        saves its input, which shares the stored state's storage, or the whole buffer the states
        are views of): those bytes are already in ``Solution.saved_bytes``, so pass these to
        ``ignore`` to count only what the backward holds *on top*.
        """
        from nde_zoo.driver.fields import graph_nodes  # the strategies import this module

        found: list[Tensor] = []
        for node in graph_nodes(outputs):
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                try:
                    found.extend(t for t in node.saved_tensors if isinstance(t, Tensor))
                except RuntimeError:  # already freed
                    pass
        return found



_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``2GB`` -> 2e9 bytes (kB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary); an integer is bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory_budget must be a size, got {value!r}")
    if isinstance(value, (int, float)):
        if not (value >= 1 and math.isfinite(value)):
            raise ValueError(f"memory_budget must be a positive number of bytes, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"memory_budget={value!r} is not a size: give bytes (an integer) or a positive number with a unit, "
            f"e.g. 512MB, 2GB, 1.5GiB"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise ValueError(f"memory_budget={value!r} is less than one byte; give e.g. 512MB or 2GB")
    return size


def format_bytes(n: float) -> str:
    """``1.5e9`` -> ``"1.50 GB"`` (decimal units, as ``memory_budget`` reads them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_memory(device: torch.device) -> int:
    """What ``memory_budget=None`` means: the device's free memory (CUDA), or MemAvailable (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))



@dataclass
class Probe:
    """A candidate measured at one prefix of the grid."""

    steps: int  # accepted steps of the probe solve
    peak: float  # bytes: the larger of the two below
    forward: float  # seconds
    backward: float  # seconds
    forward_peak: float = 0.0  # bytes the allocator held at most during the forward solve (above its start)
    backward_peak: float = 0.0  # ... during the backward pass (the forward's kept tensors included)
    outputs: int = 2  # output times of the probe solve

    def as_dict(self) -> dict[str, float]:
        return asdict(self)



def measure_solve(strategy: Any, field: Any, y0: Tensor, ts: Tensor, repeats: int = 3,
                  memory: bool = True) -> Probe:
    """One solve's forward and backward (unit cotangent): the most the allocator held above what
    it held before, during the forward and during the backward (unless ``memory`` is false: one
    timed run only), then the better of ``repeats`` timed runs. Gradients go to
    ``torch.autograd.grad``, never into ``.grad``."""
    from nde_zoo.driver.fields import field_parameters  # strategies import this module

    params = field_parameters(field)
    y0 = y0.detach().requires_grad_(y0.requires_grad)
    inputs = ([y0] if y0.requires_grad else []) + params
    cuda = y0.device.type == "cuda"

    def run(meter: AllocatorPeak | None) -> tuple[int, float, float, float, float]:
        counted = meter is not None and meter.available  # the allocator, by profiler events
        estimated = meter is not None and not counted and not cuda  # under a user's profiler
        if cuda:
            torch.cuda.synchronize(y0.device)
            base = torch.cuda.memory_allocated(y0.device)
            torch.cuda.reset_peak_memory_stats(y0.device)
        start = time.perf_counter()
        with meter.phase("forward") if counted else contextlib.nullcontext():
            solution = strategy.solve(field, y0, ts)
        forward_peak = backward_peak = 0.0
        if cuda:
            torch.cuda.synchronize(y0.device)
            forward_peak = torch.cuda.max_memory_allocated(y0.device) - base
            torch.cuda.reset_peak_memory_stats(y0.device)
        middle = time.perf_counter()
        with meter.phase("backward") if counted else contextlib.nullcontext():
            cotangent = torch.ones_like(solution.ys)
            if inputs and solution.ys.requires_grad:
                if estimated:  # autograd's own count: what was kept plus what the backward held
                    live = LiveSaved(params + LiveSaved.kept_by(solution.ys))
                    with live.hooks:
                        torch.autograd.grad(solution.ys, inputs, cotangent, allow_unused=True)
                    backward_peak = solution.saved_bytes + live.peak + solution.stats.held_bytes
                else:
                    torch.autograd.grad(solution.ys, inputs, cotangent, allow_unused=True)
            del cotangent
        if cuda:
            torch.cuda.synchronize(y0.device)
            backward_peak = torch.cuda.max_memory_allocated(y0.device) - base
        end = time.perf_counter()
        return solution.stats.accepted_steps, float(forward_peak), float(backward_peak), middle - start, end - middle

    if memory and not cuda:
        with AllocatorPeak() as meter:
            steps, forward_peak, backward_peak, forward, backward = run(meter)
        if meter.available:  # the events are read when the profiler stops
            forward_peak, backward_peak = meter.peak("forward"), meter.peak("backward")
        else:
            _warn_once("another profiler is running, so the probes' memory is autograd's count (what is kept "
                       "for backward plus what the backward holds), not the allocator's: the budget may be "
                       "exceeded by the field's transient tensors")
    else:
        steps, forward_peak, backward_peak, forward, backward = run(None)
    for _ in range(repeats):
        _, _, _, f, b = run(None)
        forward, backward = min(forward, f), min(backward, b)
    return Probe(steps=max(steps, 1), peak=max(forward_peak, backward_peak), forward=forward, backward=backward,
                  forward_peak=forward_peak, backward_peak=backward_peak, outputs=len(ts))


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("memory: %s", message)


class AllocatorPeak:
    """The most bytes the CPU allocator held at once, above what it held when the block began.

    Made of the profiler's memory events (``torch.profiler`` with ``profile_memory=True``: every
    allocation and free of the CPU allocator, in order): the running total of those events is
    what the allocator holds above the start; its maximum, over the whole block or within the
    intervals marked with :meth:`phase`, is the peak. This is what a user checks with the
    profiler (docs/auto.md), and on the CPU what :class:`Auto` probes and budgets.

    Frees of memory allocated before the block are not in the events (the profiler cannot size
    them), so the peak never reads low. While another profiler runs (a user's), this one cannot
    start: :attr:`available` is false and :meth:`peak` raises.
    """

    def __init__(self) -> None:
        self.available = not profiler_running()
        self._profiler: Any = None
        self._events: list[tuple[int, int]] = []  # (time ns, bytes: + allocated, - freed)
        self._phases: dict[str, list[tuple[int, int]]] = {}  # name -> [(start ns, end ns)]

    def __enter__(self) -> AllocatorPeak:
        if self.available:
            from torch.profiler import ProfilerActivity, profile

            # The profiler writes lines of its own to stderr (starting, stopping, a warning about
            # memory allocated before it): kept out of the console for the whole block.
            self._quiet = _quiet_profiler()
            self._quiet.__enter__()
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            try:
                self._profiler.__enter__()
            except RuntimeError:  # another profiler is running on this thread
                self._profiler = None
                self.available = False
                self._quiet.__exit__(None, None, None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._profiler is None:
            return
        try:
            self._profiler.__exit__(*exc)
        finally:
            self._quiet.__exit__(None, None, None)
        self._events, self._phases = profiler_memory_events(self._profiler, _PHASE)
        self._profiler = None

    def phase(self, name: str) -> Any:
        """A ``with`` block whose allocations :meth:`peak` ``(name)`` looks at."""
        from torch.profiler import record_function

        return record_function(_PHASE + name)

    def mark(self, name: str) -> None:
        """An instant named ``name`` (e.g. from a gradient hook): :meth:`peak` can start there."""
        with self.phase(name):
            pass

    def peak(self, *phases: str, since: str | None = None, until: str | None = None) -> float:
        """The most held at once within the named phases (none named: the whole block), or from
        the instant ``since`` to the end of the phase ``until``."""
        if not self.available:
            raise RuntimeError("the allocator's peak is unknown: another profiler was running")
        windows = [w for name in phases for w in self._phases.get(name, [])]
        if since is not None and until is not None:
            starts, ends = self._phases.get(since, []), self._phases.get(until, [])
            if starts and ends:
                windows.append((starts[0][0], ends[-1][1]))
        if not phases and since is None:
            windows = [(-1, 2**63)]
        live = best = 0
        for when, nbytes in self._events:
            live += nbytes
            if live > best and any(a <= when <= b for a, b in windows):
                best = live
        return float(best)


_PHASE = "nde_zoo.memory::"


@contextlib.contextmanager
def _quiet_profiler() -> Any:
    """Starting and stopping the profiler writes lines of its own to the process's stderr (file
    descriptor 2); keep those out of the user's console and log, and pass on everything else."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not re.search(r"ActivityProfiler|profiler_st(art|op)|CPUAllocator\.cpp", line)]
            if kept:
                os.write(2, "".join(kept).encode())
