"""Time in the logs: a fit's CSV log alone compares ``compile=true`` with ``compile=false``: both
log the seconds per training step, and the compiled one the seconds it spent compiling."""

from __future__ import annotations

import csv

import lightning
import torch
from torch.utils.data import DataLoader, TensorDataset

from nde_zoo.callbacks import StepTimer
from nde_zoo.models import ODEClassifier
from nde_zoo.strategies import Reversible


def _logged(tmp_path, compile: bool) -> list[dict[str, str]]:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=16)
    model = ODEClassifier(Reversible("rk4", steps=2, compile=compile), state_dim=4, width=8)
    folder = tmp_path / ("compiled" if compile else "eager")
    logger = lightning.pytorch.loggers.CSVLogger(folder, name="csv")
    trainer = lightning.Trainer(max_epochs=1, logger=logger, callbacks=[StepTimer()], accelerator="cpu",
                                enable_progress_bar=False, enable_checkpointing=False,
                                enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, loader)
    with open(next(folder.glob("csv/version_*/metrics.csv")), newline="") as handle:
        return [r for r in csv.DictReader(handle) if r.get("time/step_s")]


def test_the_csv_log_compares_compiled_with_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("NDE_ZOO_COMPILE_BACKEND", "aot_eager")  # the same tracing, no C++ build
    eager, compiled = _logged(tmp_path, False), _logged(tmp_path, True)
    assert len(eager) == len(compiled) == 1
    for row in (eager[0], compiled[0]):
        assert 0 < float(row["time/step_s"]) < 600
    assert float(eager[0]["time/compile_s"]) == 0.0
    assert float(compiled[0]["time/compile_s"]) > 0.0
    # from the command's start (here: nde_zoo's import) to the end of the first training step, compile included
    assert float(compiled[0]["time/first_step_s"]) >= float(compiled[0]["time/compile_s"]) > 0.0
    assert float(eager[0]["time/first_step_s"]) > 0.0


def test_the_first_step_is_logged_once_per_process(tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="nde_zoo")
    timer = StepTimer()
    model = ODEClassifier(Reversible("rk4", steps=2), state_dim=4, width=8)
    loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=16)
    trainer = lightning.Trainer(max_epochs=2, logger=lightning.pytorch.loggers.CSVLogger(tmp_path, name="csv"),
                                callbacks=[timer], accelerator="cpu", enable_progress_bar=False,
                                enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, loader)
    lines = [r.getMessage() for r in caplog.records if "first training step done" in r.getMessage()]
    assert len(lines) == 1 and "after the command started" in lines[0], lines
    with open(next(tmp_path.glob("csv/version_*/metrics.csv")), newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("time/step_s")]
    assert len(rows) == 2 and rows[0]["time/first_step_s"] and not rows[1]["time/first_step_s"]
