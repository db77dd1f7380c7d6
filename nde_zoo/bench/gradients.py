"""Gradient fidelity of every ODE strategy x solver: exact ones at round-off, adjoints at their tolerance.

For each strategy and solver, one batch's loss gradient is taken in float64 and compared
(relative 2-norm error, the largest over the parameter groups ``embed``/``field``/``head``)
with two references, both through :func:`nde_zoo.fidelity.gradient_fidelity`:

1. backprop through the *same* discretisation (:func:`nde_zoo.fidelity.reference_strategy`:
   ``Direct`` on the same tableau and stepping; autograd through the coupled recursion for
   ``reversible``). Exact strategies must land at round-off (<= 1e-10); the continuous
   adjoints (``adjoint``, ``seminorm``) solve a different, backward ODE, so their error is of
   the order of their tolerance (adaptive) or of the solver's discretisation error (fixed steps);
2. ``Direct`` with dopri5 at rtol 1e-10, atol 1e-12: the gradient of the exact flow, to
   show the discretisation error that every strategy carries whatever its backward pass.

``ernode`` is :class:`~nde_zoo.strategies.LocalERNODE` around ``symplectic``. Its solve
lands on an extra sampled time ``t_reg`` and its training loss adds the regulariser, so
its reference is the same wrapper around ``Direct`` with the same seed (same ``t_reg``,
same grid) and the compared gradient is that of the *training* loss (task loss plus
regulariser; for every other strategy the regulariser is zero). This checks that the
regulariser's cotangent at an intermediate output time goes through the inner strategy's
backward exactly. Against the tight reference the task (validation) loss is compared.

Models at their seed-0 initial weights: the ODE classifier on one batch of 64 digits and
(full run) the FFJORD CNF, exact trace, on 128 two-moons points.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.fidelity import gradient_fidelity

__all__ = ["run", "make_strategy", "EXACT", "ADJOINTS", "EXACT_BAR", "ADJOINT_FACTOR", "GOALS"]

EXACT = ("direct", "checkpoint", "symplectic", "reversible", "ernode")
ADJOINTS = ("adjoint", "seminorm")
FIXED = ("euler", "midpoint", "rk4", "rk38")
ADAPTIVE = ("bosh3", "dopri5", "tsit5")
RTOL, ATOL = 1e-6, 1e-8
TIGHT = dict(rtol=1e-10, atol=1e-12)
EXACT_BAR = 1e-10
#: an adaptive adjoint cell is "at its tolerance" when its error is <= this times rtol
ADJOINT_FACTOR = 10.0
#: goal id -> what it asks; every run prints a verdict for each, per model
GOALS = {
    "exact": f"every exact strategy within {EXACT_BAR:.0e} of backprop through the same discretisation, "
             "in every cell",
    "adjoint": f"every adaptive adjoint cell within {ADJOINT_FACTOR:g} x rtol of it",
}


def make_strategy(name: str, solver: str, stepping: dict[str, Any]) -> Any:
    """The strategy ``name`` on ``solver`` with ``stepping`` (``steps=`` or ``rtol=, atol=``)."""
    from nde_zoo.strategies import Adjoint, Checkpoint, Direct, LocalERNODE, Reversible, Seminorm, Symplectic

    if name == "ernode":
        return LocalERNODE(Symplectic(solver, **stepping))
    classes = dict(direct=Direct, checkpoint=Checkpoint, symplectic=Symplectic, reversible=Reversible,
                   adjoint=Adjoint, seminorm=Seminorm)
    return classes[name](solver, **stepping)


@dataclass
class _Problem:
    name: str
    label: str
    build: Callable[[Any], Any]
    batch: Any


def _digits() -> _Problem:
    from nde_zoo.datamodules import DigitsDataModule
    from nde_zoo.models import ODEClassifier

    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(data.train_dataloader()))
    return _Problem("ode_classifier", "ODE classifier, digits (batch 64, state 32, MLP width 100)",
                    lambda s: ODEClassifier(s), batch)


def _cnf() -> _Problem:
    from nde_zoo.datamodules.toy2d import sample_toy2d
    from nde_zoo.models import CNF

    points = sample_toy2d("two_moons", 128, seed=0)
    return _Problem("cnf", "FFJORD CNF, two moons (128 points, exact trace, width 64, depth 2)",
                    lambda s: CNF(s), (points,))


def _reason(exc: Exception) -> str:
    """The first clause of the strategy's own message, without the ``strategy 'name'`` prefix."""
    text = str(exc).split(";")[0].split(":")[0].strip()
    return re.sub(r"^strategy '\w+' ", "", text)[:90]


def _cell(problem: _Problem, name: str, solver: str, stepping: dict[str, Any]) -> dict[str, Any]:
    from nde_zoo.strategies import Direct

    try:
        make_strategy(name, solver, stepping)
    except (ValueError, TypeError) as exc:
        return {"rejected": _reason(exc)}
    start = time.perf_counter()
    try:
        same = gradient_fidelity(problem.build, make_strategy(name, solver, stepping), problem.batch,
                                 stage="train")
        tight = gradient_fidelity(problem.build, make_strategy(name, solver, stepping), problem.batch,
                                  reference=Direct("dopri5", **TIGHT), stage="val")
    except Exception as exc:  # a solver failure is a result too: report it in the cell
        return {"failed": f"{type(exc).__name__}: {_reason(exc)}"}
    return {
        "same": same, "tight": tight, "seconds": time.perf_counter() - start,
        "same_max": max(v for k, v in same.items() if k != "all"),
        "tight_max": max(v for k, v in tight.items() if k != "all"),
    }


def _fmt(cell: dict[str, Any], key: str) -> str:
    if "rejected" in cell:
        return f"rejected: {cell['rejected']}"
    if "failed" in cell:
        return f"failed: {cell['failed']}"
    return f"{cell[key]:.1e}"


def _measured(cells: dict[str, dict[str, dict[str, Any]]], strategies: tuple[str, ...],
              solvers: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(s, v, cells[s][v]) for s in strategies for v in solvers if "same_max" in cells[s][v]]


def _notes(problem: str, cells: dict[str, dict[str, dict[str, Any]]], solvers: list[str]) -> list[str]:
    notes = []
    exact = _measured(cells, EXACT, solvers)
    met = [c for c in exact if c[2]["same_max"] <= EXACT_BAR]
    missed = ", ".join(f"{s}/{v} {c['same_max']:.1e}" for s, v, c in exact if c["same_max"] > EXACT_BAR)
    worst = max((c[2]["same_max"] for c in exact), default=float("nan"))
    notes.append(
        f"{problem}: exact strategies are <= {EXACT_BAR:.0e} from backprop through the same discretisation "
        "in "
        f"{len(met)}/{len(exact)} cells (largest {worst:.1e})" + (f"; missed: {missed}" if missed else "")
        + "."
    )
    adaptive = _measured(cells, ADJOINTS, [v for v in solvers if v in ADAPTIVE])
    if adaptive:
        ratios = [c["same_max"] / RTOL for _, _, c in adaptive]
        within = sum(1 for r in ratios if r <= ADJOINT_FACTOR)
        notes.append(
            f"{problem}: adaptive adjoint cells are {min(ratios):.2g}-{max(ratios):.2g} x rtol ({RTOL:.0e}); "
            f"{within}/{len(adaptive)} within {ADJOINT_FACTOR:g} x rtol. All are above round-off "
            f"(smallest {min(c['same_max'] for _, _, c in adaptive):.1e}): the adjoint ODE is not the "
            f"gradient of the forward discretisation (and torchdiffeq picks its own forward steps)."
        )
    fixed = _measured(cells, ADJOINTS, [v for v in solvers if v in FIXED])
    if fixed:
        disc = {v: cells["direct"][v].get("tight_max", float("nan")) for v in solvers}
        parts = [f"{s}/{v} {c['same_max']:.1e} vs {disc[v]:.1e}" for s, v, c in fixed]
        below = sum(1 for _, v, c in fixed if c["same_max"] <= disc[v])
        notes.append(
            f"{problem}: fixed-step adjoints (no tolerance; the backward solve takes the forward's step "
            f"size) err by the order of the solver's own discretisation error (adjoint error vs Direct's "
            f"error against the tight reference; {below}/{len(fixed)} below it): " + "; ".join(parts) + "."
        )
    rejected = [f"{s}/{v} ({cells[s][v]['rejected']})" for s in cells for v in solvers
                if "rejected" in cells[s][v]]
    if rejected:
        notes.append(f"{problem}: rejected by the strategy: " + ", ".join(rejected) + ".")
    failed = [f"{s}/{v} ({cells[s][v]['failed']})" for s in cells for v in solvers if "failed" in cells[s][v]]
    if failed:
        notes.append(f"{problem}: failed: " + ", ".join(failed) + ".")
    return notes


def _verdicts(problem: str, table: int, cells: dict[str, dict[str, dict[str, Any]]],
              solvers: list[str]) -> list[Verdict]:
    """The two goals on one model, from the cells of its first table (index ``table``)."""
    columns = {v: f"{v} ({'fixed' if v in FIXED else 'adaptive'})" for v in solvers}
    exact = [cells[s][v] for s in EXACT for v in solvers]
    worst = math.nan if any("same_max" not in c for c in exact) else max(c["same_max"] for c in exact)
    out = [Verdict("exact", problem, (Check(
        "largest exact-strategy error", worst, "<=", EXACT_BAR,
        Source(table, EXACT, tuple(columns.values()), "max"), fmt=".1e"),))]
    adaptive = [v for v in solvers if v in ADAPTIVE]
    measured = [c["same_max"] for _, _, c in _measured(cells, ADJOINTS, adaptive)]
    out.append(Verdict("adjoint", problem, (Check(
        "largest adaptive adjoint error", max(measured) if measured else None, "<=", ADJOINT_FACTOR * RTOL,
        Source(table, ADJOINTS, tuple(columns[v] for v in adaptive), "max"), fmt=".1e"),)))
    return out


def _figure(results: dict[str, Any], solvers: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [*EXACT, *ADJOINTS]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (problem, cells) in zip(axes[0], results.items(), strict=True):
        grid = [[math.log10(max(cells[s][v].get("same_max", float("nan")), 1e-17)) for v in solvers]
                for s in strategies]
        image = ax.imshow(grid, vmin=-17, vmax=-1, cmap="viridis")
        ax.set_xticks(range(len(solvers)), solvers, rotation=45)
        ax.set_yticks(range(len(strategies)), strategies)
        ax.set_title(f"{problem}: log10 rel. error vs same-discretisation backprop", fontsize=8)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def run(quick: bool = False) -> BenchReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> BenchReport:
    steps = 4 if quick else 10
    solvers = ["midpoint", "rk4", "dopri5"] if quick else [*FIXED, *ADAPTIVE]
    problems = [_digits()] if quick else [_digits(), _cnf()]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    tables, notes, verdicts = [], [], []
    for problem in problems:
        cells: dict[str, dict[str, dict[str, Any]]] = {}
        for name in (*EXACT, *ADJOINTS):
            cells[name] = {}
            for solver in solvers:
                stepping = dict(steps=steps) if solver in FIXED else dict(rtol=RTOL, atol=ATOL)
                cells[name][solver] = _cell(problem, name, solver, stepping)
        results[problem.name] = cells
        columns = ["strategy", *(f"{v} ({'fixed' if v in FIXED else 'adaptive'})" for v in solvers)]
        tables.append(Table(
            f"{problem.label}: relative gradient error vs float64 backprop through the same discretisation "
            f"(max over parameter groups)",
            columns, [[s, *(_fmt(cells[s][v], "same_max") for v in solvers)] for s in cells],
        ))
        tables.append(Table(
            f"{problem.label}: relative gradient error vs Direct dopri5 rtol 1e-10 (the discretisation "
            f"error, for context)",
            columns, [[s, *(_fmt(cells[s][v], "tight_max") for v in solvers)] for s in cells],
        ))
        notes += _notes(problem.name, cells, solvers)
        verdicts += _verdicts(problem.name, len(tables) - 2, cells, solvers)
    elapsed = time.perf_counter() - started
    count = sum(len(r) * len(solvers) for r in results.values())
    notes.append(f"Took {elapsed:.0f} s single-threaded ({count} cells).")
    summary = (
        "Gradient fidelity of every ODE strategy x solver (`nde_zoo/bench/gradients.py`, built on "
        "`nde_zoo.fidelity`, the code behind `python -m nde_zoo gradcheck`): one batch's loss gradient in "
        "float64 at seed-0 initial weights, relative 2-norm error, the largest over the parameter groups. "
        f"Fixed-step solvers take {steps} steps on [0, 1]; adaptive ones rtol {RTOL:.0e}, atol {ATOL:.0e} "
        "(the adjoints' backward solve too). First table per model: against backprop through the same "
        "discretisation (Direct with the same tableau and stepping; autograd through the coupled recursion "
        f"for reversible). Goals: {GOALS['exact']} (direct, checkpoint, symplectic, reversible, ernode); "
        f"{GOALS['adjoint']} (the continuous adjoints solve another ODE). Second table: "
        "against Direct dopri5 at rtol 1e-10, the discretisation error that no backward pass removes. "
        "`ernode` is LocalERNODE around symplectic, compared on its training loss (task loss + regulariser) "
        "with LocalERNODE around Direct at the same seed (same sampled time, same grid). torchdiffeq, which "
        "the adjoints run, has no classic rk4 (its `rk4` is our rk38) nor tsit5: those cells say so."
    )
    return BenchReport(
        name="gradients",
        summary=summary,
        tables=tables,
        data={"steps": steps, "rtol": RTOL, "atol": ATOL, "tight": TIGHT, "exact_bar": EXACT_BAR,
              "adjoint_factor": ADJOINT_FACTOR, "solvers": solvers, "seconds": elapsed, "results": results},
        figures={} if quick else {"heatmap": _figure(results, solvers)},
        notes=notes,
        verdicts=verdicts,
    )
