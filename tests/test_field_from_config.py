"""A field of your own given as a config is saved as that config, so every way of loading works safely.

From the command line (``'model.field={_target_: my_project.MyField, ...}'``) the field used to be
built by Hydra before the model saw it, so the checkpoint held the pickled module: ``fit``'s final
test, ``test ckpt_path=`` and a resume failed in ``torch.load(weights_only=True)`` with "Unsupported
global". The model now gets the config and builds the field itself, the checkpoint's hyperparameters
hold the config, and the checkpoint loads with ``weights_only=True`` on every path. A field given from
Python as an ``nn.Module`` instance is still pickled; a safe load of such a checkpoint names the
classes it would have to unpickle and the ways to read it.

The fits run in this process (``nde_zoo.cli.main``), on a few batches of two moons.
"""

from __future__ import annotations

import csv
import pickle

import hydra
import pytest
import torch
from torch import nn

from nde_zoo.models import CNF
from nde_zoo.strategies import Reversible
from tests.test_run_directories import nde_zoo_in_process


class ResField(nn.Module):
    """A user's velocity ``f(t, z) = W2 softplus(W1 [z, t])`` for the CNF, imported by its target path."""

    def __init__(self, dim: int, width: int = 8) -> None:
        super().__init__()
        self.inner = nn.Linear(dim + 1, width)
        self.outer = nn.Linear(width, dim)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.outer(nn.functional.softplus(self.inner(torch.cat([z, t.to(z).expand(len(z), 1)], 1))))


TARGET = f"{__name__}.ResField"
FIELD = f"model.field={{_target_: {TARGET}, dim: 2, width: 6}}"
TINY = [
    "model=cnf",
    "model.width=8",
    "model.baseline_components=0",
    "strategy=reversible",
    "strategy.solver=rk4",
    "strategy.steps=2",
    "data.n_train=64",
    "data.n_val=16",
    "data.n_test=16",
    "data.batch_size=32",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
]


def _velocity(model: CNF) -> nn.Module:
    return model.field.net


def _tested(run) -> bool:
    """Whether the run in ``run`` logged a test NLL."""
    rows = [row for f in run.glob("csv/version_*/metrics.csv") for row in csv.DictReader(f.open())]
    return any(row.get("test/nll") for row in rows)


def test_a_field_from_the_command_line_survives_every_way_of_loading(tmp_path, monkeypatch):
    run = tmp_path / "fit"
    nde_zoo_in_process("fit", *TINY, FIELD, f"hydra.run.dir={run}", monkeypatch=monkeypatch)
    assert _tested(run)  # fit's own final test read its best checkpoint
    last = run / "checkpoints" / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["field"] == {"_target_": TARGET, "dim": 2, "width": 6}

    nde_zoo_in_process("test", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'test'}",
                       "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
                       monkeypatch=monkeypatch)
    assert _tested(tmp_path / "test")

    resumed = tmp_path / "resumed"
    nde_zoo_in_process("fit", *TINY, FIELD, "trainer.max_epochs=2", "test_after_fit=false",
                       f"ckpt_path={last}", f"hydra.run.dir={resumed}", monkeypatch=monkeypatch)
    again = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert again["epoch"] == 1 and again["hyper_parameters"]["field"]["_target_"] == TARGET

    model = CNF.load_from_checkpoint(last, weights_only=True)
    assert isinstance(_velocity(model), ResField) and _velocity(model).inner.out_features == 6
    weights = saved["state_dict"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert isinstance(_velocity(CNF.load_from_checkpoint(last)), ResField)  # the default (trusting) load too


@pytest.fixture
def pickled_field_checkpoint(tmp_path):
    """A checkpoint of a CNF given its field from Python as a module: the module is pickled in it."""
    model = CNF(Reversible("rk4", steps=2), width=8, baseline_components=0, field=ResField(2, 6))
    trainer = hydra.utils.instantiate(
        {"_target_": "lightning.Trainer"}, max_steps=1, limit_val_batches=0, logger=False, callbacks=[],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=8))
    path = tmp_path / "pickled.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_pickled_field_names_its_classes_and_the_safe_way(pickled_field_checkpoint, tmp_path, monkeypatch):
    path = pickled_field_checkpoint
    with pytest.raises(pickle.UnpicklingError) as safe:
        CNF.load_from_checkpoint(path, weights_only=True)
    message = str(safe.value)
    assert TARGET in message and "torch.nn.modules.linear.Linear" in message
    assert "field" in message and "_target_" in message  # give it as a config instead
    assert "torch.serialization.safe_globals" in message

    with torch.serialization.safe_globals([ResField, nn.Linear]):  # what the message says, done
        model = CNF.load_from_checkpoint(path, weights_only=True)
    assert isinstance(_velocity(model), ResField)
    assert isinstance(_velocity(CNF.load_from_checkpoint(path)), ResField)  # trusted: weights_only=False

    with pytest.raises(SystemExit) as cli:  # the command line reads only what loads safely, and says why
        nde_zoo_in_process("test", "model=cnf", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'test'}",
                           monkeypatch=monkeypatch)
    said = str(cli.value.code)
    assert TARGET in said and "model.field={_target_:" in said, said
