"""Seed 004's MNIST table at CPU scale: local ERNODE regularisation lowers test-time NFE.

The ``ode_classifier`` on scikit-learn's digits (and MNIST when its IDX files are under
``data/mnist``), solved by adaptive tsit5 through :class:`Direct`; rows: vanilla, local
unbiased, local biased; several seeds each. Reported: train and test accuracy, training
time, prediction time per batch, test NFE (mean +- std over seeds). Goal (Pal et al.):
test NFE <= 0.65x vanilla at test accuracy within 0.5 points, prediction time lower alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning
import torch

from nde_zoo.bench.report import BenchReport, Table
from nde_zoo.datamodules import DigitsDataModule, MNISTDataModule
from nde_zoo.models import ODEClassifier
from nde_zoo.strategies import Direct, GradientStrategy, LocalERNODE

__all__ = ["run"]

RTOL, ATOL = 1e-5, 1e-6


def _inner() -> Direct:
    return Direct("tsit5", rtol=RTOL, atol=ATOL)


def _rows(epochs: int) -> dict[str, callable]:
    decay = 20 * epochs  # digits: ~20 training steps per epoch
    return {
        "vanilla": lambda seed: _inner(),
        "local unbiased": lambda seed: LocalERNODE(_inner(), sampling="unbiased", coef_start=1.0, coef_end=0.1,
                                                   decay_steps=decay, seed=seed),
        "local biased": lambda seed: LocalERNODE(_inner(), sampling="biased", coef_start=1.0, coef_end=0.1,
                                                 decay_steps=decay, seed=seed),
    }


def _fit_and_measure(strategy: GradientStrategy, datamodule, in_features: int, epochs: int, seed: int) -> dict:
    lightning.seed_everything(seed, workers=True)
    model = ODEClassifier(strategy, in_features=in_features)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    train_seconds = time.perf_counter() - start
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        pairs = [(model(x).argmax(-1) == y).float() for x, y in datamodule.train_dataloader()]
    train_acc = float(torch.cat(pairs).mean())
    batches = list(datamodule.test_dataloader())
    with torch.no_grad():
        start = time.perf_counter()
        for x, _ in batches:
            model(x)
        predict_seconds = (time.perf_counter() - start) / len(batches)
    return {"train_acc": train_acc, "test_acc": test["test/acc"], "test_nfe": test["test/nfe"],
            "train_seconds": train_seconds, "predict_seconds": predict_seconds}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4g} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.2g}"


def _table(name: str, datamodule, in_features: int, epochs: int, seeds: list[int]) -> tuple[Table, dict, list]:
    results: dict[str, list[dict]] = {}
    for row, make in _rows(epochs).items():
        results[row] = [_fit_and_measure(make(seed), datamodule, in_features, epochs, seed) for seed in seeds]
    rows = []
    for row, runs in results.items():
        rows.append([row] + [_mean_std([100 * r[k] for r in runs]) for k in ("train_acc", "test_acc")]
                    + [_mean_std([r[k] for r in runs]) for k in ("train_seconds", "predict_seconds", "test_nfe")])
    vanilla = results["vanilla"]
    notes = []
    for row in ("local unbiased", "local biased"):
        nfe = statistics.mean(r["test_nfe"] for r in results[row]) / statistics.mean(r["test_nfe"] for r in vanilla)
        acc = 100 * (statistics.mean(r["test_acc"] for r in results[row]) - statistics.mean(r["test_acc"] for r in vanilla))
        pred = statistics.mean(r["predict_seconds"] for r in results[row]) / statistics.mean(
            r["predict_seconds"] for r in vanilla)
        met = "met" if nfe <= 0.65 and acc >= -0.5 else "missed"
        notes.append(f"{name}, {row}: test NFE {nfe:.2f}x vanilla, test accuracy {acc:+.2f} points, "
                     f"prediction time {pred:.2f}x (goal NFE <= 0.65x within 0.5 points: {met}).")
    table = Table(f"{name}: ODE classifier, tsit5 rtol={RTOL} atol={ATOL}, {epochs} epochs, seeds {seeds}",
                  ["row", "train acc %", "test acc %", "train s", "predict s / batch", "test NFE"], rows)
    return table, results, notes


def run(quick: bool = False) -> BenchReport:
    torch.set_num_threads(1)  # small models: threads only add noise on a shared 2-core machine
    seeds = [0, 1] if quick else [0, 1, 2]
    epochs = 2 if quick else 30
    tables, data, notes = [], {}, []
    table, data["digits"], n = _table("digits", DigitsDataModule(), 64, epochs, seeds)
    tables.append(table)
    notes += n
    if not quick and all((Path("data/mnist") / f).exists() or (Path("data/mnist") / (f + ".gz")).exists()
                         for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")):
        table, data["mnist"], n = _table("MNIST", MNISTDataModule(), 784, 5, seeds)
        tables.append(table)
        notes += n
    else:
        notes.append("MNIST rows skipped: its IDX files are not under data/mnist (nothing is downloaded).")
    return BenchReport(
        name="ernode",
        summary=("Pal et al.'s MNIST table at CPU scale: the ODE classifier trained with adaptive tsit5 "
                 "through Direct backprop, vanilla against local ERNODE regularisation (unbiased and biased "
                 "sampling, coef 1.0 -> 0.1 decaying over training), mean +- std over seeds. Test NFE and "
                 "prediction time are measured with the regulariser off, as at inference."),
        tables=tables, data=data, notes=notes,
    )
