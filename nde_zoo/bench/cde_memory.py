"""Foster's (2024) Neural CDE table: reversible solvers train as well as backprop with far less memory.

McCallum & Foster (Foster 2024; McCallum & Foster 2024, arXiv:2410.11648) train a Neural CDE on CharacterTrajectories with
midpoint, RK4 and Dopri5, each through their reversible solver and through plain backprop,
and report test accuracy and memory. Here: the Neural CDE of ``model=cde`` on JapaneseVowels
(embedded; CharacterTrajectories too when its .ts files are under ``data/uea``), midpoint and
RK4 at one step per knot, dopri5 adaptive (rtol 1e-3, atol 1e-6), :class:`Reversible` vs
:class:`Direct`, several seeds. Memory is what autograd keeps for the backward pass per
training step (``memory/saved_bytes``: bytes of the tensors saved, each storage once), the
CPU measure of ``docs/benchmarks.md``, and the peak RSS growth of one training step on a
batch of 256 in a fresh process (what the backward pass allocates too); also training time
and test accuracy.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning
import torch

from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.bench.rss import training_step_rss_growth
from nde_zoo.datamodules import UEADataModule
from nde_zoo.models import NeuralCDE
from nde_zoo.strategies import Direct, GradientStrategy, Reversible

__all__ = ["run", "SOLVERS", "classification_loss", "GOALS"]

SOLVERS = ("midpoint", "rk4", "dopri5")
RSS_BAR, ACC_BAR = 2.5, -1.0
#: goal id -> what it asks (Foster 2024: "similar accuracy, 2.5-6x less GPU memory"); a verdict per solver
GOALS = {
    "memory": f"reversible's peak RSS growth of a training step >= {RSS_BAR}x lower than backprop's",
    "accuracy": f"reversible's test accuracy at most {-ACC_BAR:g} point below backprop's",
}


def make_strategy(kind: str, solver: str, knots: int) -> GradientStrategy:
    """``Direct`` or ``Reversible`` with the solver: one step per knot, or adaptive for dopri5."""
    stepping = dict(rtol=1e-3, atol=1e-6) if solver == "dopri5" else dict(steps=knots - 1)
    return (Reversible if kind == "reversible" else Direct)(solver, **stepping)


def classification_loss(model: NeuralCDE, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``model`` on ``batch = (x, y)``: one training step's loss, for the RSS probe."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model.classify(x)[0], y)


def _fit(datamodule: UEADataModule, strategy: GradientStrategy, seed: int, epochs: int) -> dict:
    lightning.seed_everything(seed, workers=True)
    model = NeuralCDE(strategy, in_channels=datamodule.num_channels, num_classes=datamodule.num_classes)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    history = strategy.history
    train = datamodule._splits["train"].tensors
    probe_batch = (train[0][:256], train[1][:256])
    model.trainer = None  # pickle the module alone
    rss = training_step_rss_growth(model, probe_batch, "nde_zoo.bench.cde_memory:classification_loss")
    return {"acc": 100.0 * test["test/acc"], "train_seconds": seconds, "rss_mb": (rss or float("nan")) / 2**20,
            "saved_mb": max(h["memory/saved_bytes"] for h in history) / 2**20,
            "nfe_forward": statistics.mean(h["nfe/forward"] for h in history)}


def _mean_std(values: list[float], fmt: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} +- {std:{fmt}}"


def _table(name: str, datamodule: UEADataModule, seeds: list[int], epochs: int, index: int,
           solvers: tuple[str, ...] = SOLVERS) -> tuple[Table, dict, list[str], list[Verdict]]:
    datamodule.setup()
    knots = datamodule._splits["train"].tensors[0].shape[1]
    results: dict[str, list[dict]] = {}
    for solver in solvers:
        for kind in ("reversible", "direct"):
            results[f"{solver}/{kind}"] = [_fit(datamodule, make_strategy(kind, solver, knots), seed, epochs)
                                           for seed in seeds]
    rows, notes, verdicts = [], [], []
    for solver in solvers:
        rev, direct = results[f"{solver}/reversible"], results[f"{solver}/direct"]
        rows.append([solver, _mean_std([r["acc"] for r in rev], ".1f"), _mean_std([r["acc"] for r in direct], ".1f"),
                     f"{statistics.mean(r['saved_mb'] for r in rev):.4g}",
                     f"{statistics.mean(r['saved_mb'] for r in direct):.4g}",
                     f"{statistics.mean(r['rss_mb'] for r in rev):.1f}",
                     f"{statistics.mean(r['rss_mb'] for r in direct):.1f}",
                     f"{statistics.mean(r['train_seconds'] for r in rev):.0f}",
                     f"{statistics.mean(r['train_seconds'] for r in direct):.0f}"])
        kept = statistics.mean(r["saved_mb"] for r in direct) / statistics.mean(r["saved_mb"] for r in rev)
        rss = statistics.mean(r["rss_mb"] for r in direct) / statistics.mean(r["rss_mb"] for r in rev)
        gap = statistics.mean(r["acc"] for r in rev) - statistics.mean(r["acc"] for r in direct)
        rss_cols = ("peak RSS growth MB backprop (batch 256)", "peak RSS growth MB reversible (batch 256)")
        verdicts += [
            Verdict("memory", f"{name}, {solver}", (Check(
                "backprop / reversible peak RSS growth", rss, ">=", RSS_BAR,
                Source(index, (solver,), rss_cols, "ratio"), fmt=".1f", unit="x"),)),
            Verdict("accuracy", f"{name}, {solver}", (Check(
                "reversible - backprop test accuracy (points)", gap, ">=", ACC_BAR,
                Source(index, (solver,), ("acc % reversible", "acc % backprop"), "diff"), fmt="+.1f"),)),
        ]
        notes.append(f"{name}, {solver}: reversible keeps {kept:.0f}x less for the backward pass and one training "
                     f"step's peak RSS growth is {rss:.1f}x lower than backprop's; test accuracy {gap:+.1f} points "
                     f"vs backprop (Foster 2024: similar accuracy, 2.5-6x less GPU memory).")
    table = Table(
        f"{name}: Neural CDE (hidden 32, g width 32), {epochs} epochs, seeds {seeds}; memory = autograd's saved "
        f"bytes per training step (batch 64)",
        ["solver", "acc % reversible", "acc % backprop", "kept MB reversible", "kept MB backprop",
         "peak RSS growth MB reversible (batch 256)", "peak RSS growth MB backprop (batch 256)",
         "train s reversible", "train s backprop"], rows)
    return table, results, notes, verdicts


def run(quick: bool = False) -> BenchReport:
    torch.set_num_threads(1)
    seeds = [0] if quick else [0, 1]
    epochs = 1 if quick else 15
    tables, data, notes, verdicts = [], {}, [], []
    solvers = ("midpoint",) if quick else SOLVERS
    table, data["JapaneseVowels"], n, v = _table("JapaneseVowels", UEADataModule(batch_size=64), seeds,
                                                 epochs, len(tables), solvers)
    tables.append(table)
    notes += n
    verdicts += v
    character = Path("data/uea/CharacterTrajectories/CharacterTrajectories_TRAIN.ts")
    if not quick and character.is_file():
        dm = UEADataModule(name="CharacterTrajectories", root="data/uea", batch_size=64)
        table, data["CharacterTrajectories"], n, v = _table("CharacterTrajectories", dm, seeds, epochs,
                                                            len(tables))
        tables.append(table)
        notes += n
        verdicts += v
    else:
        notes.append("CharacterTrajectories (the talk's set) skipped: its .ts files are not under data/uea "
                     "(`data=character_trajectories data.download=true` fetches them when online).")
    return BenchReport(
        name="cde_memory",
        summary=("Foster's (2024) Neural CDE table at CPU scale: midpoint, RK4 (one step per knot) and adaptive dopri5, "
                 "each through the reversible solver (McCallum & Foster) and through plain backprop (`Direct`); "
                 "test accuracy (mean +- std over seeds), memory kept for the backward pass and training "
                 "time (--quick: midpoint only, one epoch). "
                 f"Goals, for each solver: {GOALS['memory']}; {GOALS['accuracy']}."),
        tables=tables, data=data, notes=notes, verdicts=verdicts)
