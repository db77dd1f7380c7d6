"""Checkpoints record the nde_zoo version that wrote them.

- A checkpoint written by a newer nde_zoo warns, naming both versions (it used to load without a word).
- An older one loads through a migration: ``tests/fixtures/checkpoint_unversioned_ernode.pt`` was written
  by the command line before checkpoints had a version (an ERNODE fit of one epoch), the first case.
"""

from __future__ import annotations

import warnings

import lightning
import pytest
import torch

from nde_zoo import __version__, checkpoints
from nde_zoo.checkpoints import CHECKSUM_KEY, add_checksum, checkpoint_version, migrate_checkpoint
from nde_zoo.models import ODEClassifier
from nde_zoo.strategies import LocalERNODE
from tests.test_run_directories import TINY, UNVERSIONED, nde_zoo_in_process


def _nde_zoo_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "nde_zoo" in str(w.message)]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(checkpoints, "_warned", set())  # each test sees its own once-per-process warnings


def test_every_checkpoint_records_the_version(tmp_path, monkeypatch):
    run = tmp_path / "run"  # the command line (with the verifying plugin)
    nde_zoo_in_process(
        "fit",
        *TINY,
        "trainer.max_epochs=1",
        "strategy.solver=rk4",
        "strategy.steps=2",
        f"hydra.run.dir={run}",
        monkeypatch=monkeypatch,
    )
    for path in (run / "checkpoints").glob("*.ckpt"):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        assert saved["nde_zoo"]["version"] == __version__ == checkpoint_version(saved)
        checkpoints.verify_checkpoint_file(path)

    from nde_zoo.datamodules import DigitsDataModule
    from nde_zoo.strategies import Direct

    model = ODEClassifier(Direct("rk4", steps=2), state_dim=4, width=8)  # a plain Trainer, no plugin
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    assert torch.load(tmp_path / "plain.ckpt", weights_only=False)["nde_zoo"]["version"] == __version__


def test_an_unversioned_checkpoint_loads_through_the_migration(tmp_path, monkeypatch):
    old = torch.load(UNVERSIONED, map_location="cpu", weights_only=False)
    assert "version" not in old["nde_zoo"] and checkpoint_version(old) is None  # as the old code wrote it
    assert migrate_checkpoint(old) == ["unversioned -> 0.1.0"]
    assert old["nde_zoo"]["version"] == "0.1.0" and old["nde_zoo"]["migrations"] == ["unversioned -> 0.1.0"]
    assert migrate_checkpoint(old) == []  # migrated once
    assert migrate_checkpoint({"state_dict": {}}) == []  # not a zoo model's checkpoint: left alone

    seen = []
    real = checkpoints._from_unversioned
    monkeypatch.setattr(checkpoints, "MIGRATIONS", [(None, "0.1.0", lambda c: (seen.append(1), real(c)))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ODEClassifier.load_from_checkpoint(UNVERSIONED)
    assert seen and not _nde_zoo_warnings(caught)
    assert isinstance(model.strategy, LocalERNODE) and model.strategy.step == 2  # its state came back

    seen.clear()  # resuming a fit from it (the plugin loads it, then the model's hook)
    run = tmp_path / "resumed"
    nde_zoo_in_process(
        "fit", *TINY, f"ckpt_path={UNVERSIONED}", f"hydra.run.dir={run}", monkeypatch=monkeypatch
    )
    assert seen
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["nde_zoo"]["version"] == __version__


def test_a_newer_checkpoint_warns_naming_both_versions(tmp_path, monkeypatch):
    newer = torch.load(UNVERSIONED, map_location="cpu", weights_only=False)
    newer["nde_zoo"]["version"] = "99.1.0"
    add_checksum(newer, newer[CHECKSUM_KEY]["scope"])
    path = tmp_path / "newer.ckpt"
    torch.save(newer, path)
    expected = f"written by nde_zoo 99.1.0, which is newer than this nde_zoo {__version__}"
    with pytest.warns(UserWarning, match=expected) as caught:
        model = ODEClassifier.load_from_checkpoint(path)
    assert len(_nde_zoo_warnings(caught)) == 1 and str(path) in _nde_zoo_warnings(caught)[0]
    assert isinstance(model, ODEClassifier)
    assert migrate_checkpoint(torch.load(path, weights_only=False)) == []  # not migrated backwards

    monkeypatch.setattr(checkpoints, "_warned", set())
    run = tmp_path / "test"  # the command line says it in its log
    nde_zoo_in_process(
        "test",
        f"ckpt_path={path}",
        "trainer.limit_test_batches=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        f"hydra.run.dir={run}",
        monkeypatch=monkeypatch,
    )
    log = (run / "cli.log").read_text()
    assert f"ckpt_path={path} ({path}) was {expected}" in log and "Upgrade nde_zoo to 99.1.0" in log
