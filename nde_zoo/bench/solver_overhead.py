"""Our fixed-step RK4 against torchdiffeq's, forward and forward+backward, side by side.

torchdiffeq's fixed-grid ``rk4`` is Kutta's 3/8 rule, our ``rk38``; our ``rk4`` is the
classic method (same cost: four evaluations per step). Two regimes (docs/compile.md):
an overhead-bound small problem and a memory-bound large one. Repeats are interleaved and
the median is reported, so machine noise hits both sides alike. Goal: ratio <= 1.0.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torchdiffeq
from torch import nn

from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.solvers import Stepping, get_tableau, odeint

__all__ = ["run", "GOALS"]

#: goal id -> what it asks; every run prints a verdict for each
GOALS = {"ratio": "every ratio ours / torchdiffeq <= 1.0 (forward and forward+backward, both regimes)"}


class _Field(nn.Module):
    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def _median_times(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def _regime(batch: int, dim: int, width: int, steps: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    field = _Field(dim, width)
    y0 = torch.randn(batch, dim)
    ts = torch.tensor([0.0, 1.0])
    stepping = Stepping(steps=steps)
    rk4, rk38 = get_tableau("rk4"), get_tableau("rk38")

    with torch.no_grad():  # sanity: the same method gives the same numbers (float64)
        f64, y64, t64 = _Field(dim, width).double(), y0.double()[:4], ts.double()
        ours = odeint(f64, y64, t64, rk38, Stepping(steps=8))[0]
        theirs = torchdiffeq.odeint(f64, y64, t64, method="rk4", options=dict(step_size=1 / 8))
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), "rk38 != torchdiffeq rk4"

    def forward(solve: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad():
                solve()
        return fn

    def backward(solve: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def fn() -> None:
            field.zero_grad(set_to_none=True)
            solve()[-1].square().sum().backward()
        return fn

    solves = {
        "ours rk4": lambda: odeint(field, y0, ts, rk4, stepping)[0],
        "ours rk38": lambda: odeint(field, y0, ts, rk38, stepping)[0],
        "torchdiffeq rk4": lambda: torchdiffeq.odeint(
            field, y0, ts, method="rk4", options=dict(step_size=1.0 / steps)
        ),
    }
    fwd = _median_times({k: forward(v) for k, v in solves.items()}, repeats)
    bwd = _median_times({k: backward(v) for k, v in solves.items()}, repeats)
    return {f"fwd {k}": v for k, v in fwd.items()} | {f"fwd+bwd {k}": v for k, v in bwd.items()}


def run(quick: bool = False) -> BenchReport:
    regimes = {
        "overhead-bound": (16, 2, 32, 100 if quick else 1000),
        "memory-bound": (256 if quick else 1024, 64, 256, 10 if quick else 100),
    }
    repeats = 3 if quick else 9
    rows, data, ratios = [], {}, []
    for kind, (batch, dim, width, steps) in regimes.items():
        label = f"{kind} (batch {batch} x {dim}, width {width}, N={steps})"
        t = _regime(batch, dim, width, steps, repeats)
        data[label] = t
        for mode in ("fwd", "fwd+bwd"):
            ref = t[f"{mode} torchdiffeq rk4"]
            ratios += [t[f"{mode} ours rk4"] / ref, t[f"{mode} ours rk38"] / ref]
            rows.append([
                label, mode, f"{1e3 * ref:.1f}", f"{1e3 * t[f'{mode} ours rk4']:.1f}",
                f"{1e3 * t[f'{mode} ours rk38']:.1f}", f"{t[f'{mode} ours rk4'] / ref:.2f}",
                f"{t[f'{mode} ours rk38'] / ref:.2f}",
            ])
    table = Table(
        "Milliseconds per solve and ratio to torchdiffeq",
        ["regime", "pass", "torchdiffeq rk4 ms", "ours rk4 ms", "ours rk38 ms", "ratio rk4", "ratio rk38"],
        rows,
    )
    worst = Check("worst ratio ours / torchdiffeq", max(ratios), "<=", 1.0,
                  Source(0, tuple((r[0], r[1]) for r in rows), ("ratio rk4", "ratio rk38"), "max"))
    return BenchReport(
        name="solver_overhead",
        summary=(
            "Fixed-step RK4 of the solver core against torchdiffeq's `odeint(method='rk4')` on the "
            "same MLP field, forward (no graph) and forward+backward (backprop through the solve). "
            f"Median of {repeats} interleaved repeats. Goal: {GOALS['ratio']}."
        ),
        tables=[table],
        data=data,
        verdicts=[Verdict("ratio", "both regimes", (worst,))],
    )
