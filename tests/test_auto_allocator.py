"""strategy=auto's memory budget bounds what the allocator really holds.

The plan's peaks are checked against the CPU allocator itself, read from the profiler's memory
events with the snippet docs/auto.md gives users (``allocator_peak`` below, independent of the
code under test): every candidate's predicted peak within 20% of it, and the chosen candidate's
within the budget. Autograd's own count (bytes kept for backward plus what the backward holds)
misses the field's transient activations and the backward's temporaries: 2-4x less.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nde_zoo.strategies import Auto
from nde_zoo.memory import AllocatorPeak

TS = torch.tensor([0.0, 1.0])


def allocator_peak(run) -> int:
    """The most bytes the CPU allocator held at once while ``run()`` ran, above what it held
    before (the snippet of docs/auto.md)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


class Residual(nn.Module):
    """A residual field of width 256: its tanh and matmul transients are what autograd misses."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, t, y):
        return y + 0.1 * self.b(torch.tanh(self.a(y)))


def _training_step(strategy, field, y0, ts=TS):
    params = list(field.parameters())

    def run():
        ys = strategy.solve(field, y0, ts).ys
        torch.autograd.grad(ys[-1].square().sum(), params)

    return run


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    return Residual(), torch.randn(32, 256)


def test_every_candidates_predicted_peak_is_the_allocators_within_20_percent(residual):
    field, y0 = residual
    auto = Auto("rk4", steps=50, memory_budget="10GB")
    plan = auto.measure(field, y0, TS)
    for row in plan.rows:
        measured = allocator_peak(_training_step(auto._build(row.label, row.snapshots), field, y0))
        assert measured == pytest.approx(row.peak_bytes, rel=0.2), (row.label, measured, row.peak_bytes)


def test_the_chosen_candidates_allocator_peak_fits_the_budget(residual):
    """At a budget just above the smallest real peak, the chosen candidate really fits. Choosing by
    autograd's count, Checkpoint with a few snapshots was chosen there, whose forward holds every
    step's state at once: its real peak was far above the budget."""
    field, y0 = residual
    candidates = ("checkpoint", "symplectic", "reversible")
    generous = Auto("midpoint", steps=100, memory_budget="10GB", candidates=candidates)
    real = {label: allocator_peak(_training_step(generous._build(label, None), field, y0))
            for label in candidates}
    budget = int(1.15 * min(real.values()))
    auto = Auto("midpoint", steps=100, memory_budget=budget, candidates=candidates)
    auto.solve(field, y0, TS)
    measured = allocator_peak(_training_step(auto.chosen, field, y0))
    assert measured <= budget, (auto.plan.markdown(), measured, real)
    assert auto.plan.chosen_row.peak_bytes <= budget


def test_checkpoints_snapshot_count_is_costed_with_the_allocators_peak(residual):
    """With fewer snapshots than steps the forward still solves into every step's state, and
    copies the snapshots out: the predicted peak of the count chosen is the allocator's."""
    field, y0 = residual
    generous = Auto("rk4", steps=100, memory_budget="10GB", candidates=("checkpoint",))
    every = generous.measure(field, y0, TS).rows[0].peak_bytes
    auto = Auto("rk4", steps=100, memory_budget=int(0.95 * every), candidates=("checkpoint",))
    row = auto.measure(field, y0, TS).rows[0]
    assert row.fits and row.snapshots is not None and row.snapshots < 100
    measured = allocator_peak(_training_step(auto._build(row.label, row.snapshots), field, y0))
    assert measured == pytest.approx(row.peak_bytes, rel=0.2) and measured <= 0.95 * every


def test_many_outputs_count_in_the_prefix_probed():
    """Outputs at every step (a loss on the whole trajectory): the probes solve the outputs that
    fall in their prefix, so the memory that grows with the outputs is extrapolated too."""
    torch.manual_seed(0)
    field, y0 = Residual(64), torch.randn(8, 64)
    ts = torch.linspace(0, 1, 41)
    auto = Auto("midpoint", steps=40, memory_budget="10GB")
    plan = auto.measure(field, y0, ts)
    for row in plan.rows:
        measured = allocator_peak(_training_step(auto._build(row.label, row.snapshots), field, y0, ts))
        assert measured == pytest.approx(row.peak_bytes, rel=0.2), (row.label, measured, row.peak_bytes)


def test_allocator_peak_reads_the_running_total_by_phase():
    with AllocatorPeak() as meter:
        with meter.phase("first"):
            a = torch.empty(250_000)  # 1 MB
            b = torch.empty(500_000)  # 2 MB: 3 MB held
            del a, b
        with meter.phase("second"):
            c = torch.empty(250_000)  # 1 MB
            del c
        meter.mark("third")
        d = torch.empty(125_000)  # 0.5 MB
        with meter.phase("end"):
            del d
    assert meter.peak("first") == pytest.approx(3e6, abs=1e4)
    assert meter.peak("second") == pytest.approx(1e6, abs=1e4)
    assert meter.peak(since="third", until="end") == pytest.approx(0.5e6, abs=1e4)
    assert meter.peak() == pytest.approx(3e6, abs=1e4)


def test_the_profilers_own_console_lines_are_kept_out(capfd):
    """Starting and stopping the profiler prints lines of its own on some builds; the probes keep
    them out of the console, and pass on what others write meanwhile."""
    import os

    with AllocatorPeak():
        os.write(2, b"a line of someone else's\n")
        torch.empty(10)
    err = capfd.readouterr().err
    assert "a line of someone else's" in err
    assert "profiler_start" not in err and "profiler_stop" not in err


def test_under_a_users_profiler_the_probe_falls_back_to_autograds_count(caplog):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    field, y0 = Residual(16), torch.randn(4, 16)
    with profile(activities=[ProfilerActivity.CPU]):
        plan = Auto("rk4", steps=8, memory_budget="1GB", candidates=("direct",)).measure(field, y0, TS)
    assert plan.choice == "direct" and plan.rows[0].peak_bytes > 0
    assert any("another profiler is running" in r.message for r in caplog.records)
