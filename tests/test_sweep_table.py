"""A sweep ends with one table of its jobs (sweep.csv, sweep.md); ``nde-zoo table FOLDER`` builds it for
any earlier folder; StepTimer logs the seconds per step, compile seconds and peak memory it reads."""

from __future__ import annotations

import csv
import sys

import lightning
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nde_zoo.callbacks import StepTimer
from nde_zoo.cli import main as cli_main
from nde_zoo.models import ODEClassifier
from nde_zoo.strategies import Reversible
from nde_zoo.sweeps import markdown, sweep_table, write_table

HEADER = "epoch,step,train/loss,val/loss,val/acc,test/acc,time/step_s,time/compile_s,memory/peak_bytes\n"


def _run(folder, overrides, rows):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "csv" / "version_0").mkdir(parents=True)
    (folder / "csv" / "version_0" / "metrics.csv").write_text(HEADER + "".join(r + "\n" for r in rows))


@pytest.fixture
def sweep(tmp_path):
    _run(
        tmp_path / "0",
        ["strategy=direct", "model.width=8"],
        [
            "0,9,1.5,,,,,,",
            "0,9,,1.2,0.5,,,,",
            "0,9,,,,,0.10,0.0,2000000",
            "1,19,,0.9,0.7,,,,",
            "1,19,,,,,0.20,0.0,3000000",
            "2,29,,1.1,0.6,,,,",
            "2,29,,,,,0.30,0.0,1000000",
            "3,29,,,,0.75,,,",
        ],
    )
    _run(
        tmp_path / "1",
        ["strategy=reversible", "model.width=8"],
        [
            "0,9,,2.0,0.4,,,,",
            "0,9,,,,,0.5,4.0,500000",
        ],
    )
    (tmp_path / "multirun.yaml").write_text("{}\n")
    return tmp_path


def test_the_table_has_every_job_its_overrides_and_figures(sweep):
    columns, rows = sweep_table(sweep)
    assert columns == [
        "job",
        "strategy",
        "model.width",
        "status",
        "epochs",
        "best val/loss",
        "best epoch",
        "final val/acc",
        "final val/loss",
        "test/acc",
        "s per step",
        "compile s",
        "peak memory MB",
    ]
    first, second = rows
    assert (first["job"], first["strategy"], first["model.width"]) == ("0", "direct", "8")
    assert (first["status"], first["epochs"], first["best val/loss"], first["best epoch"]) == (
        "finished",
        3,
        0.9,
        1,
    )
    assert (first["final val/loss"], first["final val/acc"], first["test/acc"]) == (1.1, 0.6, 0.75)
    assert first["s per step"] == pytest.approx(0.2) and first["compile s"] == 0.0
    assert first["peak memory MB"] == pytest.approx(3.0)
    assert (second["strategy"], second["status"], second.get("test/acc"), second["compile s"]) == (
        "reversible",
        "unfinished",
        None,
        4.0,
    )


def test_markdown_says_common_overrides_once(sweep):
    text = markdown(*sweep_table(sweep))
    lines = text.splitlines()
    assert lines[0] == "Every run: model.width=8"
    assert lines[2].startswith("| job | strategy | status | epochs | best val/loss |")
    assert lines[4].startswith("| 0 | direct | finished | 3 | 0.9 | 1 |")
    assert lines[5].startswith("| 1 | reversible | unfinished | 1 | 2 | 0 |") and lines[5].endswith(
        "| 0.5 | 4 | 0.5 |"
    )


def test_the_table_subcommand_writes_csv_and_markdown(sweep, tmp_path, capsys, monkeypatch):
    out = tmp_path / "elsewhere"
    monkeypatch.setattr(sys, "argv", ["nde-zoo", "table", str(sweep), "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        cli_main()
    assert stop.value.code == 0
    assert "| 0 | direct | finished |" in capsys.readouterr().out
    with open(out / "sweep.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["strategy"] for r in table] == ["direct", "reversible"]
    assert table[0]["best val/loss"] == "0.9" and table[0]["model.width"] == "8"
    assert (out / "sweep.md").read_text().startswith("Every run: model.width=8")


def test_a_folder_without_runs_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs under"):
        write_table(tmp_path)


def test_step_timer_logs_step_seconds_compile_seconds_and_peak_memory(tmp_path):
    x = torch.randn(64, 64)
    y = torch.randint(0, 10, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = ODEClassifier(Reversible("rk4", steps=2), state_dim=4, width=8)
    trainer = lightning.Trainer(
        max_epochs=2,
        logger=lightning.pytorch.loggers.CSVLogger(tmp_path, name="csv"),
        callbacks=[StepTimer()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1000,
    )
    trainer.fit(model, loader)
    with open(next(tmp_path.glob("csv/version_*/metrics.csv")), newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("time/step_s")]
    assert [r["epoch"] for r in rows] == ["0", "1"]  # every epoch, whatever log_every_n_steps is
    assert all(0 < float(r["time/step_s"]) < 60 and float(r["time/compile_s"]) == 0.0 for r in rows)
    assert all(float(r["memory/peak_bytes"]) > 0 for r in rows)


def test_a_sweep_ends_with_its_table(cli, tmp_path):
    """The one command-line test: a real two-job sweep writes sweep.csv and sweep.md into its folder."""
    folder = tmp_path / "sweep"
    out = cli(
        "fit",
        "-m",
        "strategy=direct,reversible",
        "strategy.solver=rk4",
        "strategy.steps=2",
        "model.state_dim=4",
        "model.width=8",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={folder}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(folder / "sweep.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["job"], r["strategy"], r["status"]) for r in table] == [
        ("0", "direct", "finished"),
        ("1", "reversible", "finished"),
    ]
    for row in table:
        assert (
            float(row["s per step"]) > 0 and float(row["compile s"]) == 0 and float(row["peak memory MB"]) > 0
        )
        assert float(row["test/acc"]) >= 0 and float(row["best val/loss"]) > 0
    assert "| job | strategy | status |" in (folder / "sweep.md").read_text()
    assert "| 1 | reversible | finished |" in out.stderr


def test_compile_seconds_count_the_inner_and_the_chosen_strategy():
    from types import SimpleNamespace

    from nde_zoo.callbacks import compile_seconds

    def strategy(seconds, **more):
        return SimpleNamespace(programs=SimpleNamespace(compile_seconds=seconds), **more)

    chosen = strategy(2.5)
    auto = strategy(0.0, chosen=chosen)
    ernode = strategy(0.25, inner=auto)
    assert compile_seconds(ernode) == 2.75 and compile_seconds(strategy(1.0, inner=None)) == 1.0
    assert compile_seconds(SimpleNamespace()) == 0.0
