"""``strategy=auto`` checked in hindsight: its plan against real training steps of every candidate.

For three problems (the white dwarf of McCallum & Foster, the CNF of the main job on two moons,
and a memory-bound batch of 2048 x 64) and two budgets each (the machine's available memory,
and a tight one: a tenth of ``Direct``'s predicted peak), :class:`~nde_zoo.strategies.Auto`
probes its candidates inside the first training step, as in training, and chooses. Then every
candidate (``Checkpoint`` with the snapshot count the plan gave it) runs real training steps
(forward, loss, backward, optimiser step) at the full ``N``, interleaved, and we measure:

- the **peak** of a training step the way the plan measures a solve (CPU: the bytes the solve
  kept for backward after the forward pass, plus the most the backward pass of the whole step
  held at once, plus the recomputed snapshots a checkpointing reversal held, ``held_bytes``; the loss's and the model's own saved tensors are not the solve's and not in the
  budget. CUDA: ``max_memory_allocated`` above what was allocated before the step, everything);
- the **seconds** of a training step (median of interleaved repeats).

Goals (issue 17): the chosen strategy's predicted peak within 20% of its measured one, and its
measured time within 10% of the fastest candidate whose measured peak fits the budget.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.strategies import Auto, MemoryBudgetError
from nde_zoo.strategies.auto import format_bytes
from nde_zoo.bench.autograd_memory import peak_autograd_bytes
from nde_zoo.strategies.base import GradientStrategy

__all__ = ["run", "GOALS"]

GOALS = {
    "peak": "the chosen strategy's predicted peak within 20% of the peak measured in a real training step",
    "time": "the chosen strategy's training step within 10% of the fastest candidate that fits, in hindsight",
}
PEAK_TOLERANCE, TIME_TOLERANCE = 0.2, 0.1
TIGHT = 0.1  # the tight budget: this fraction of Direct's predicted peak


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


def _peak(problem: Problem, strategy: GradientStrategy) -> float:
    """One training step's peak, measured as the plan measures a solve (module docstring)."""
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
    seconds = _seconds(problem, strategies, repeats)
    return {"budget": budget_name, "budget_bytes": plan.budget, "plan": plan, "peaks": peaks, "seconds": seconds,
            "probe_seconds": probe_seconds, "error": None}


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
            tight = int(TIGHT * direct.peak_bytes)
            cases.append(_case(problem, tight, f"tight ({format_bytes(tight)})", repeats))
        for case in cases:
            label = f"{problem.name}; budget {case['budget']}"
            if case["error"]:
                notes.append(f"{label}: {case['error']}")
                continue
            plan = case["plan"]
            data[label] = {"plan": plan.to_dict(), "measured_peak": case["peaks"], "measured_s": case["seconds"],
                           "probe_s": case["probe_seconds"]}
            fitting = [r.label for r in plan.rows if case["peaks"][r.label] <= case["budget_bytes"]]
            for row in plan.rows:
                rows.append([
                    problem.name, case["budget"], row.label + (f" (c={row.snapshots})" if row.snapshots else ""),
                    f"{row.peak_bytes / 1e6:.4f}", f"{case['peaks'][row.label] / 1e6:.4f}",
                    f"{row.seconds * 1e3:.3f}", f"{case['seconds'][row.label] * 1e3:.3f}",
                    "yes" if row.label in fitting else "no", "chosen" if row.label == plan.choice else "",
                ])
            chosen = next(r for r in rows[-len(plan.rows):] if r[-1] == "chosen")
            key = tuple(chosen[:3])
            peak_source = Source(0, (key,), ("measured peak MB", "predicted peak MB"), "ratio")
            ratio = case["peaks"][plan.choice] / plan.chosen_row.peak_bytes
            checks = (Check("measured / predicted peak", ratio, ">=", 1 - PEAK_TOLERANCE, peak_source),
                      Check("measured / predicted peak", ratio, "<=", 1 + PEAK_TOLERANCE, peak_source))
            verdicts.append(Verdict("peak", label, checks))
            others = [tuple(r[:3]) for r in rows[-len(plan.rows):] if r[7] == "yes"]
            best = min((case["seconds"][lab] for lab in fitting), default=float("nan"))
            time_source = Source(0, (key, *others), ("measured ms per step",), "ratio_to_min")
            verdicts.append(Verdict("time", label, (Check(
                "chosen / fastest fitting (measured)", case["seconds"][plan.choice] / best, "<=", 1 + TIME_TOLERANCE,
                time_source),)))
            notes.append(f"{label}: probing took {case['probe_seconds']:.2f} s (the first training step, "
                         f"with it), one {plan.choice} step {case['seconds'][plan.choice]:.3f} s")
    table = Table(
        "Plan against real training steps",
        ["problem", "budget", "candidate", "predicted peak MB", "measured peak MB", "predicted ms per solve",
         "measured ms per step", "fits (measured)", "chosen"],
        rows,
    )
    return BenchReport(
        name="auto",
        summary=(
            "`strategy=auto` probes its candidates (a few steps each) inside the first training step and "
            "chooses the fastest whose predicted peak fits the budget; here every candidate then runs real "
            f"training steps at the full N (median of {repeats} interleaved repeats; 'predicted ms per solve' is the "
            "plan's forward and backward of the solve, 'measured ms per step' a whole training step's). "
            f"Goals: {GOALS['peak']}; {GOALS['time']}."
        ),
        tables=[table],
        notes=notes,
        data=data,
        verdicts=verdicts,
    )
