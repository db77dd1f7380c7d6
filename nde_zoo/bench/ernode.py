"""Pal et al.'s (ICML 2023) MNIST table at CPU scale: local ERNODE regularisation lowers test-time NFE.

The ``ode_classifier`` on scikit-learn's digits (and MNIST when its IDX files are under
``data/mnist``), solved by adaptive tsit5 through :class:`Direct`; rows: vanilla, local
unbiased, local biased; several seeds each. Reported: train and test accuracy, training
time, prediction time per batch, test NFE (mean +- std over seeds). Goal (Pal et al.):
test NFE <= 0.65x vanilla at test accuracy within 0.5 points, prediction time lower alike
(``GOALS``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning
import torch

from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.datamodules import DigitsDataModule, MNISTDataModule
from nde_zoo.models import ODEClassifier
from nde_zoo.strategies import Direct, GradientStrategy, LocalERNODE

__all__ = ["run", "GOALS"]

RTOL, ATOL = 1e-5, 1e-6
NFE_BAR, ACC_BAR, PREDICT_BAR = 0.65, -0.5, 1.0
#: goal id -> what it asks (Pal et al.); every run prints a verdict for each, per regularised row
GOALS = {
    "nfe": f"test NFE <= {NFE_BAR}x vanilla at test accuracy within {-ACC_BAR} points below vanilla",
    "predict": f"prediction time per batch <= {PREDICT_BAR}x vanilla",
}


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


def _table(name: str, datamodule, in_features: int, epochs: int, seeds: list[int], index: int
           ) -> tuple[Table, dict, list[Verdict]]:
    """Train every row on every seed; the table is ``index``-th of the report (for the verdicts' sources)."""
    results: dict[str, list[dict]] = {}
    for row, make in _rows(epochs).items():
        results[row] = [_fit_and_measure(make(seed), datamodule, in_features, epochs, seed) for seed in seeds]
    rows = []
    for row, runs in results.items():
        rows.append([row] + [_mean_std([100 * r[k] for r in runs]) for k in ("train_acc", "test_acc")]
                    + [_mean_std([r[k] for r in runs]) for k in ("train_seconds", "predict_seconds", "test_nfe")])
    def mean(row: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[row])

    verdicts = []
    for row in ("local unbiased", "local biased"):
        nfe = mean(row, "test_nfe") / mean("vanilla", "test_nfe")
        acc = 100 * mean(row, "test_acc") - 100 * mean("vanilla", "test_acc")
        pred = mean(row, "predict_seconds") / mean("vanilla", "predict_seconds")
        verdicts.append(Verdict("nfe", f"{name}, {row}", (
            Check("test NFE / vanilla", nfe, "<=", NFE_BAR,
                  Source(index, (row, "vanilla"), ("test NFE",), "ratio"), unit="x"),
            Check("test accuracy - vanilla's (points)", acc, ">=", ACC_BAR,
                  Source(index, (row, "vanilla"), ("test acc %",), "diff"), fmt="+.2f"))))
        verdicts.append(Verdict("predict", f"{name}, {row}", (
            Check("prediction time / vanilla", pred, "<=", PREDICT_BAR,
                  Source(index, (row, "vanilla"), ("predict s / batch",), "ratio"), unit="x"),)))
    table = Table(f"{name}: ODE classifier, tsit5 rtol={RTOL} atol={ATOL}, {epochs} epochs, seeds {seeds}",
                  ["row", "train acc %", "test acc %", "train s", "predict s / batch", "test NFE"], rows)
    return table, results, verdicts


def run(quick: bool = False) -> BenchReport:
    torch.set_num_threads(1)  # small models: threads only add noise on a shared 2-core machine
    seeds = [0] if quick else [0, 1, 2]
    epochs = 2 if quick else 30
    tables, data, notes, verdicts = [], {}, [], []
    table, data["digits"], v = _table("digits", DigitsDataModule(), 64, epochs, seeds, len(tables))
    tables.append(table)
    verdicts += v
    if not quick and all((Path("data/mnist") / f).exists() or (Path("data/mnist") / (f + ".gz")).exists()
                         for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")):
        table, data["mnist"], v = _table("MNIST", MNISTDataModule(), 784, 5, seeds, len(tables))
        tables.append(table)
        verdicts += v
    else:
        notes.append("MNIST rows skipped: its IDX files are not under data/mnist (nothing is downloaded).")
    return BenchReport(
        name="ernode",
        summary=("Pal et al.'s MNIST table at CPU scale: the ODE classifier trained with adaptive tsit5 "
                 "through Direct backprop, vanilla against local ERNODE regularisation (unbiased and biased "
                 "sampling, coef 1.0 -> 0.1 decaying over training), mean +- std over seeds. Test NFE and "
                 "prediction time are measured with the regulariser off, as at inference. Goals, for each "
                 f"regularised row: {GOALS['nfe']}; {GOALS['predict']}."),
        tables=tables, data=data, notes=notes, verdicts=verdicts,
    )
