"""Stored states live in buffers allocated once: the forward pass's peak RSS stays flat in N.

The probe: a field Linear(8, 2048) -> tanh -> Linear(2048, 8), batch 256, rk4, float32.
Before, Symplectic's and Checkpoint's forward passes kept each step start as its own small
tensor, carved from the hole a freed 2 MB activation left, and peak RSS grew by one hole per
step: 56 MiB at N = 25, 195-205 MiB at N = 100 for 0.8 MB of states. Now 18-24 MiB at both.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nde_zoo.solvers import Stepping, get_tableau
from nde_zoo.solvers.integrate import StateStore

#: One fresh process imports what the probe needs, then forks a child per measurement: each child
#: starts from that post-import state, as a fresh process running the probe would (imports, then the
#: warm-up, the trim and the measured solve), without paying the 8 s of imports again (four processes
#: took 35 s). Prints one JSON line ``[strategy, steps, MiB of peak RSS growth]`` per measurement.
PROBE = r"""
import ctypes, json, os, sys, traceback, torch
from torch import nn
from nde_zoo.strategies import Checkpoint, Symplectic

def growth(strategy, steps):
    torch.set_num_threads(1); torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 2048), nn.Tanh(), nn.Linear(2048, 8))
    field = lambda t, y: net(y)
    def kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    y0, ts = torch.randn(256, 8), torch.tensor([0.0, 1.0])
    cls = {"symplectic": Symplectic, "checkpoint": Checkpoint}[strategy]
    cls("rk4", steps=2).solve(field, y0, ts)  # warm up the allocator and the kernels
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = kib("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
    cls("rk4", steps=steps).solve(field, y0.requires_grad_(), ts)
    return (kib("VmHWM:") - before) / 1024

sys.stdout.flush()
for strategy, steps in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:  # the child: one measurement, then out without running the parent's exit handlers
        try:
            print(json.dumps([strategy, steps, growth(strategy, steps)]), flush=True)
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the measurement of {strategy} at N = {steps} failed (status {status})")
sys.stdout.flush()
os._exit(0)  # all measured: skip the interpreter's teardown (1-2 s)
"""


@pytest.fixture(scope="module")
def forward_growth() -> dict[tuple[str, int], float]:
    """``{(strategy, steps): MiB}``: the forward pass's peak RSS growth, each in a process of its own."""
    cases = [[strategy, steps] for strategy in ("symplectic", "checkpoint") for steps in (25, 100)]
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert len(rows) == len(cases), out.stdout
    return {(strategy, steps): mib for strategy, steps, mib in rows}


def test_store_keeps_order_across_chunks():
    store = StateStore(None)
    states = [torch.full((2, 3), float(i)) for i in range(StateStore.CHUNK * 2 + 5)]
    for s in states:
        store.append(s)
    out = store.states()
    assert len(out) == len(states) and all(torch.equal(a, b) for a, b in zip(out, states))
    assert len({t.untyped_storage().data_ptr() for t in out}) == 3  # three chunks, not 133 tensors


def test_fixed_steps_use_one_buffer():
    store = StateStore(10)
    for i in range(10):
        store.append(torch.full((4,), float(i)))
    out = store.states()
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
    assert [float(t[0]) for t in out] == list(range(10))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("strategy", ["symplectic", "checkpoint"])
def test_forward_peak_rss_is_flat_in_steps(forward_growth, strategy):
    small, large = forward_growth[strategy, 25], forward_growth[strategy, 100]
    # 75 more steps were 140-150 MiB more before; now the difference is noise
    assert large < small + 30.0, (small, large)


def test_a_long_solve_keeps_its_step_times_compactly():
    """The path of a solve holds 8 bytes a step for its times and its sizes (an ``array('d')``);
    a list of Python floats held 32 (+95 MiB for one 10^6-step solve under no_grad)."""
    from nde_zoo.solvers import odeint

    import tracemalloc

    steps = 20_000
    tracemalloc.start()
    try:
        with torch.no_grad():
            _, path, _ = odeint(lambda t, y: -y, torch.ones(1, 1), torch.tensor([0.0, 1.0]), get_tableau("euler"),
                                Stepping.of(steps=steps))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.steps == steps
    # At its peak the solve held the grid's times and sizes, not lists of floats (measured: 95 MiB
    # of peak RSS growth for 10^6 steps before, 16 MiB after)
    assert peak / steps < 24, f"{peak / steps:.1f} bytes per step at the peak"
    held = sys.getsizeof(path.times) + sys.getsizeof(path.sizes)
    held += sum(sys.getsizeof(x) for x in path.times) if isinstance(path.times, list) else 0
    assert held / steps < 2 * 8 + 1, f"{held / steps:.1f} bytes per step"
    assert isinstance(path.times[3], float) and path.times[-1] == 1.0
