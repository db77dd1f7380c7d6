"""Self-describing checkpoints.

Every model saves its constructor arguments, the strategy as a config, so
``Model.load_from_checkpoint(path)`` needs no arguments; ``validate``/``test``/``predict
ckpt_path=...`` reuse the run's model, data and strategy; a checkpoint of another model is
refused with both names. Before: ``hparams.yaml`` was ``{}`` and loading failed with "missing 1
required positional argument: 'strategy'".
"""

from __future__ import annotations

import csv

import hydra
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from nde_zoo.configs_path import config_dir
from nde_zoo.train import build

SMALL = {  # model -> overrides that make one step cheap
    "ode_classifier": ["data.batch_size=16", "model.state_dim=4", "model.width=8"],
    "cnf": ["data.n_train=64", "data.n_val=16", "data.n_test=16", "data.batch_size=32", "model.width=8"],
    "latent_ode": ["data.n_train=8", "data.n_val=4", "data.n_test=4", "data.batch_size=4", "model.hidden_dim=4",
                   "model.latent_dim=2", "model.field_width=8", "model.decoder_width=8", "model.encoder_width=8"],
    "cde": ["data.batch_size=16", "model.hidden_dim=4", "model.width=8"],
    "sde": ["data.batch_size=16", "model.state_dim=4", "model.width=8"],
    "latent_sde": ["data.n_train=8", "data.n_val=4", "data.n_test=4", "data.batch_size=4", "model.latent_dim=2",
                   "model.context_dim=2", "model.width=8", "model.encoder_hidden=4"],
}
STRATEGY = {"sde": "strategy=reversible", "latent_sde": "strategy=direct"}  # others: a nested ernode


def _fit_one_step(model_name: str, tmp_path):
    strategy = STRATEGY.get(model_name, "strategy=ernode")
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=[f"model={model_name}", strategy, "strategy.seed=3"
                                        if strategy == "strategy=ernode" else "strategy.max_steps=500",
                                        *SMALL[model_name]])
    datamodule, model, _ = build(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, max_steps=1, limit_val_batches=0, logger=False, callbacks=[],
                                      enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / f"{model_name}.ckpt"
    trainer.save_checkpoint(path)
    return model, path


@pytest.mark.parametrize("model_name", sorted(SMALL))
def test_load_from_checkpoint_needs_no_arguments(model_name, tmp_path):
    model, path = _fit_one_step(model_name, tmp_path)
    loaded = type(model).load_from_checkpoint(path)
    assert repr(loaded.strategy) == repr(model.strategy)
    assert loaded.hparams["strategy"]["_target_"].startswith("nde_zoo.strategies.")
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ernode_inner_strategy_comes_back_from_the_checkpoint(tmp_path):
    model, path = _fit_one_step("ode_classifier", tmp_path)
    loaded = type(model).load_from_checkpoint(path)
    inner = loaded.hparams["strategy"]["inner"]
    assert inner["_target_"] == "nde_zoo.strategies.direct.Direct" and inner["solver"] == "dopri5"
    assert repr(loaded.strategy.inner) == repr(model.strategy.inner)


def test_a_checkpoint_of_another_model_names_both(tmp_path):
    from nde_zoo.models import CNF

    _, path = _fit_one_step("ode_classifier", tmp_path)
    with pytest.raises(ValueError, match=r"ODEClassifier \(model=ode_classifier\).*CNF \(model=cnf\)"):
        CNF.load_from_checkpoint(path)


def test_cli_test_reads_the_runs_config_and_overrides_still_apply(cli, tmp_path):
    run = tmp_path / "run"
    fit = cli("fit", "model=cnf", "strategy=reversible", "strategy.solver=rk4", "strategy.steps=2", *SMALL["cnf"],
              "trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
              "test_after_fit=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    hparams = yaml.safe_load(next(run.glob("csv/version_*/hparams.yaml")).read_text())
    assert hparams["strategy"]["_target_"] == "nde_zoo.strategies.reversible.Reversible", hparams
    assert hparams["width"] == 8

    out = cli("test", f"ckpt_path={ckpt}", "strategy.steps=3", f"hydra.run.dir={tmp_path / 'test'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "CNF with gradient strategy Reversible(solver='rk4', steps=3" in log, log[-3000:]
    rows = list(csv.DictReader(next((tmp_path / "test").glob("csv/version_*/metrics.csv")).open()))
    assert any(r.get("test/nll") for r in rows)

    wrong = cli("validate", f"ckpt_path={ckpt}", "model=ode_classifier", cwd=tmp_path)
    assert wrong.returncode != 0
    assert "written by model nde_zoo.models.cnf.CNF (model=cnf)" in wrong.stderr, wrong.stderr[-3000:]
    assert "model=ode_classifier" in wrong.stderr
