"""``strategy=auto`` checked in hindsight: its plan against real training steps of every candidate.

For three problems (the white dwarf of McCallum & Foster, the CNF of the main job on two moons,
and a memory-bound batch of 2048 x 64) and two budgets each (the machine's available memory,
and a tight one: the geometric mean of ``Direct``'s predicted peak and the smallest
candidate's, so that ``Direct`` does not fit and something else does), :class:`~nde_zoo.strategies.Auto`
probes its candidates inside the first training step, as in training, and chooses. Then every
candidate (``Checkpoint`` with the snapshot count the plan gave it) runs real training steps
(forward, loss, backward, optimiser step) at the full ``N``, interleaved, and we measure:

- the **allocator's peak** during the training step's solve: on the CPU the running total of the
  profiler's memory events (``torch.profiler``, ``profile_memory=True``: every allocation and
  free), above what was allocated when the step began, at its highest while the solve's forward
  runs or from the moment its output's gradient is ready to the end of the step's backward (the
  solve's backward and the parameters' gradients); on CUDA ``max_memory_allocated`` above what
  was allocated before the step, for the whole step;
- beside it, autograd's count (the bytes the solve kept for backward, plus the most the backward
  pass held at once, plus a checkpointing reversal's recomputed snapshots): what the budget
  compared before it counted the allocator; it misses the field's transients and the backward's
  temporaries;
- the **seconds** of a training step (median of interleaved repeats).

Goals: every candidate's predicted peak within 20% of the allocator's peak, the chosen one's
allocator peak within the budget, and the chosen one's measured time within 10% of the fastest
candidate whose allocator peak fits the budget.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.strategies import Auto, MemoryBudgetError
from nde_zoo.memory import AllocatorPeak, format_bytes
from nde_zoo.bench.autograd_memory import peak_autograd_bytes
from nde_zoo.strategies.base import GradientStrategy

__all__ = ["run", "GOALS"]

GOALS = {
    "peak": "every candidate's predicted peak within 20% of the allocator's peak in a real training step's solve",
    "budget": "the chosen strategy's allocator peak at most the budget",
    "time": "the chosen strategy's training step within 10% of the fastest candidate that fits, in hindsight",
}
PEAK_TOLERANCE, TIME_TOLERANCE = 0.2, 0.1


@dataclass
class Problem:
    """A training step that solves through ``strategy``: ``step(strategy) -> loss``."""

    name: str
    solver: str
    steps: int
    module: nn.Module  # what holds the trainable parameters
    step: Callable[[GradientStrategy], Tensor]
    device: torch.device


def _white_dwarf(quick: bool) -> Problem:
    from nde_zoo.bench.white_dwarf import H, WhiteDwarfODE, white_dwarf_data

    ts, truth = white_dwarf_data(0.05 if quick else H)
    torch.manual_seed(0)
    field = WhiteDwarfODE().double()

    def step(strategy: GradientStrategy) -> Tensor:
        return (strategy.solve(field, truth[0], ts).ys - truth).pow(2).mean()

    return Problem(f"white dwarf, midpoint, N={len(ts) - 1}", "midpoint", len(ts) - 1, field, step,
                   torch.device("cpu"))


def _cnf(quick: bool) -> Problem:
    import warnings

    from nde_zoo.datamodules.toy2d import Toy2DDataModule
    from nde_zoo.models import CNF
    from nde_zoo.strategies import Direct

    steps = 4 if quick else 20
    data = Toy2DDataModule(n_train=512, batch_size=128 if quick else 512)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    model = CNF(strategy=Direct("rk4", steps=steps))

    def step(strategy: GradientStrategy) -> Tensor:
        model.strategy = strategy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log() outside a Trainer
            return model._common_step(batch, "train")

    return Problem(f"CNF two moons, batch {len(batch[0])}, rk4, N={steps}", "rk4", steps, model, step,
                   torch.device("cpu"))


def _memory_bound(quick: bool) -> Problem:
    batch, dim, width, steps = (256, 32, 64, 20) if quick else (2048, 64, 128, 100)
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = field

        def forward(self, t: Tensor, y: Tensor) -> Tensor:
            return self.net(y)

    module = Field()
    y0 = torch.randn(batch, dim)
    ts = torch.tensor([0.0, 1.0])

    def step(strategy: GradientStrategy) -> Tensor:
        return strategy.solve(module, y0, ts).ys[-1].square().mean()

    return Problem(f"memory-bound, batch {batch} x {dim}, width {width}, midpoint, N={steps}", "midpoint", steps,
                   module, step, torch.device("cpu"))


def _allocator_peak(problem: Problem, strategy: GradientStrategy) -> float:
    """The most the allocator held during one training step's solve (module docstring)."""
    cuda = problem.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(problem.device)
        base = torch.cuda.memory_allocated(problem.device)
        torch.cuda.reset_peak_memory_stats(problem.device)
    meter = AllocatorPeak()
    solve = strategy.solve

    def marked(*args: Any, **kwargs: Any) -> Any:  # the solve's forward, and when its backward begins
        with meter.phase("solve"):
            solution = solve(*args, **kwargs)
        if solution.ys.requires_grad:
            solution.ys.register_hook(lambda grad: meter.mark("solve backward"))
        return solution

    strategy.solve = marked  # type: ignore[method-assign]
    try:
        with meter:
            loss = problem.step(strategy)
            with meter.phase("step backward"):
                loss.backward()
            del loss
    finally:
        del strategy.solve
    problem.module.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(problem.device)
        return float(torch.cuda.max_memory_allocated(problem.device) - base)
    return max(meter.peak("solve"), meter.peak(since="solve backward", until="step backward"))


def _peak(problem: Problem, strategy: GradientStrategy) -> float:
    """Autograd's count of one training step's solve: kept for backward plus what the backward
    held at once (module docstring)."""
    params = [p for p in problem.module.parameters() if p.requires_grad]
    cuda = problem.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(problem.device)
        base = torch.cuda.memory_allocated(problem.device)
        torch.cuda.reset_peak_memory_stats(problem.device)
    strategy._solutions.clear()
    strategy._recording = True  # the solves' own saved bytes (their hooks shadow the outer count)
    try:
        loss = problem.step(strategy)
        records = list(strategy._solutions)
        kept = sum(r.saved_bytes for r in records)  # the solve's share, as the plan counts it
    finally:
        strategy._stop_recording()
    peak = peak_autograd_bytes(loss, kept, params)
    peak += sum(r.stats.held_bytes for r in records)  # a checkpointing reversal's snapshots
    problem.module.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(problem.device)
        return float(torch.cuda.max_memory_allocated(problem.device) - base)
    return float(peak)


def _seconds(problem: Problem, strategies: dict[str, GradientStrategy], repeats: int) -> dict[str, float]:
    """Median seconds of a training step (forward, backward, SGD update), repeats interleaved."""
    optimiser = torch.optim.SGD(problem.module.parameters(), lr=0.0)  # lr 0: the weights stay put
    samples: dict[str, list[float]] = {k: [] for k in strategies}
    for r in range(repeats + 1):
        for label, strategy in strategies.items():
            start = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            problem.step(strategy).backward()
            optimiser.step()
            if problem.device.type == "cuda":
                torch.cuda.synchronize(problem.device)
            if r:  # the first round warms up
                samples[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def _case(problem: Problem, budget: int | None, budget_name: str, repeats: int) -> dict[str, Any]:
    auto = Auto(problem.solver, steps=problem.steps, memory_budget=budget)
    auto.announce = False
    start = time.perf_counter()
    try:
        problem.step(auto).backward()
        error = None
    except MemoryBudgetError as exc:
        error = str(exc).splitlines()[0]
    probe_seconds = time.perf_counter() - start
    problem.module.zero_grad(set_to_none=True)
    plan = auto.plan if error is None else None
    if plan is None:
        return {"budget": budget_name, "error": error}
    strategies = {row.label: auto._build(row.label, row.snapshots) for row in plan.rows}
    peaks = {label: _peak(problem, s) for label, s in strategies.items()}
    allocator = {label: _allocator_peak(problem, s) for label, s in strategies.items()}
    seconds = _seconds(problem, strategies, repeats)
    return {"budget": budget_name, "budget_bytes": plan.budget, "plan": plan, "peaks": peaks,
            "allocator": allocator, "seconds": seconds, "probe_seconds": probe_seconds, "error": None}


def run(quick: bool = False) -> BenchReport:
    repeats = 2 if quick else 5
    rows: list[list[str]] = []
    verdicts: list[Verdict] = []
    notes: list[str] = []
    data: dict[str, Any] = {}
    for make in (_white_dwarf, _cnf, _memory_bound):
        problem = make(quick)
        generous = _case(problem, None, "available", repeats)
        cases = [generous]
        if generous.get("plan") is not None:
            direct = next(r for r in generous["plan"].rows if r.label == "direct")
            smallest = min(r.peak_bytes for r in generous["plan"].rows)
            tight = int(math.sqrt(direct.peak_bytes * smallest))  # Direct does not fit; something else does
            cases.append(_case(problem, tight, f"tight ({format_bytes(tight)})", repeats))
        for case in cases:
            label = f"{problem.name}; budget {case['budget']}"
            if case["error"]:
                notes.append(f"{label}: {case['error']}")
                continue
            plan = case["plan"]
            data[label] = {"plan": plan.to_dict(), "allocator_peak": case["allocator"],
                           "autograd_peak": case["peaks"], "measured_s": case["seconds"],
                           "probe_s": case["probe_seconds"]}
            allocator = case["allocator"]
            fitting = [r.label for r in plan.rows if allocator[r.label] <= case["budget_bytes"]]
            first = len(rows)
            for row in plan.rows:
                rows.append([
                    problem.name, case["budget"], row.label + (f" (c={row.snapshots})" if row.snapshots else ""),
                    f"{row.peak_bytes / 1e6:.4f}", f"{allocator[row.label] / 1e6:.4f}",
                    f"{allocator[row.label] / row.peak_bytes:.3f}", f"{case['peaks'][row.label] / 1e6:.4f}",
                    f"{row.seconds * 1e3:.3f}", f"{case['seconds'][row.label] * 1e3:.3f}",
                    "yes" if row.label in fitting else "no", "chosen" if row.label == plan.choice else "",
                ])
            for row, cells in zip(plan.rows, rows[first:], strict=True):
                source = Source(0, (tuple(cells[:3]),), ("allocator peak MB", "predicted peak MB"), "ratio")
                ratio = allocator[row.label] / row.peak_bytes
                verdicts.append(Verdict("peak", f"{label}, {cells[2]}", (
                    Check("allocator / predicted peak", ratio, ">=", 1 - PEAK_TOLERANCE, source),
                    Check("allocator / predicted peak", ratio, "<=", 1 + PEAK_TOLERANCE, source))))
            chosen = next(r for r in rows[first:] if r[-1] == "chosen")
            key = tuple(chosen[:3])
            verdicts.append(Verdict("budget", label, (Check(
                "chosen's allocator peak MB", allocator[plan.choice] / 1e6, "<=", case["budget_bytes"] / 1e6,
                Source(0, (key,), ("allocator peak MB",), "value"), fmt=".4f"),)))
            others = [tuple(r[:3]) for r in rows[first:] if r[-2] == "yes"]
            best = min((case["seconds"][lab] for lab in fitting), default=float("nan"))
            time_source = Source(0, (key, *others), ("measured ms per step",), "ratio_to_min")
            verdicts.append(Verdict("time", label, (Check(
                "chosen / fastest fitting (measured)", case["seconds"][plan.choice] / best, "<=", 1 + TIME_TOLERANCE,
                time_source),)))
            notes.append(f"{label}: probing took {case['probe_seconds']:.2f} s (the first training step, "
                         f"with it), one {plan.choice} step {case['seconds'][plan.choice]:.3f} s")
    table = Table(
        "Plan against real training steps",
        ["problem", "budget", "candidate", "predicted peak MB", "allocator peak MB", "allocator / predicted",
         "autograd's count MB", "predicted ms per solve", "measured ms per step", "fits (allocator)", "chosen"],
        rows,
    )
    return BenchReport(
        name="auto",
        summary=(
            "`strategy=auto` probes its candidates (a few steps each) inside the first training step and "
            "chooses the fastest whose predicted peak fits the budget; here every candidate then runs real "
            f"training steps at the full N (median of {repeats} interleaved repeats; 'predicted ms per solve' is the "
            "plan's forward and backward of the solve, 'measured ms per step' a whole training step's). "
            "'allocator peak' is the most the allocator held during the training step's solve, from the "
            "profiler's memory events (torch.profiler, profile_memory=True) on the CPU, above what it held "
            "when the step began; 'autograd's count' is the bytes kept for backward plus what the backward "
            "held, what the budget compared before (it misses the field's transients and the backward's "
            f"temporaries). Goals: {GOALS['peak']}; {GOALS['budget']}; {GOALS['time']}."
        ),
        tables=[table],
        notes=notes,
        data=data,
        verdicts=verdicts,
    )
