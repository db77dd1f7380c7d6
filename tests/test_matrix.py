"""The capability matrix: every model x strategy x solver cell trains one step or raises the
documented error. The expected outcome comes from the small rule table below, not from the
code under test."""

from __future__ import annotations

import re

import lightning
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from nde_zoo.configs_path import config_dir
from nde_zoo.train import build

MODELS = {  # model -> overrides that make one step cheap
    "ode_classifier": ["data.batch_size=32", "model.state_dim=8", "model.width=16"],
    "cnf": ["data.n_train=128", "data.n_val=32", "data.n_test=32", "data.batch_size=64", "model.width=8"],
    "latent_ode": ["data.n_train=16", "data.n_val=4", "data.n_test=4", "data.batch_size=8", "data.n_obs=10",
                   "model.latent_dim=2", "model.hidden_dim=8", "model.field_width=8", "model.decoder_width=8",
                   "model.encoder_width=8"],
    "cde": ["data.batch_size=16", "model.hidden_dim=4", "model.width=8"],
    "sde": ["data.batch_size=32", "model.state_dim=8", "model.width=16"],
    "latent_sde": ["data.n_train=16", "data.n_val=4", "data.n_test=4", "data.batch_size=8", "model.latent_dim=2",
                   "model.context_dim=2", "model.width=8", "model.encoder_hidden=4"],
}
SDE_MODELS = {"sde", "latent_sde"}  # solve SDEs: direct, adjoint, reversible, ernode (configs/model/*.yaml)
STRATEGIES = ["direct", "checkpoint", "adjoint", "seminorm", "reversible", "symplectic", "ernode", "auto"]
SOLVERS = {  # solver -> stepping overrides
    "rk4": ["steps=3", "rtol=null", "atol=null"],
    "midpoint": ["steps=3", "rtol=null", "atol=null"],
    "dopri5": ["rtol=1e-3", "atol=1e-5"],
    "tsit5": ["rtol=1e-3", "atol=1e-5"],
}
TORCHDIFFEQ = {"euler", "midpoint", "rk38", "heun", "bosh3", "dopri5"}


def expected(model: str, strategy: str, solver: str) -> str | None:
    """The rule table: None when the cell must train, else a regex of its error."""
    if model not in MODELS:
        return rf"Could not find 'model/{model}'"
    if strategy not in STRATEGIES:
        return rf"Could not find 'strategy/{strategy}'"
    if strategy in ("adjoint", "seminorm") and solver not in TORCHDIFFEQ:
        return rf"torchdiffeq, which has no '{solver}' solver"
    if model in SDE_MODELS and strategy in ("checkpoint", "seminorm", "symplectic", "auto"):
        return (rf"gradient strategy '{strategy}' does not support SDEs, which model '\w+' solves; "
                r"strategies that do: adjoint, direct, ernode, reversible")
    if model == "latent_sde" and strategy == "reversible" and "steps=3" in SOLVERS[solver]:
        # 3 steps over [0, 2] miss the 1/16-spaced observation times; an adaptive config uses the model's dt
        return r"reversible Heun, whose gradient is exact only when every output time is on its step grid"
    return None


def overrides(model: str, strategy: str, solver: str) -> list[str]:
    out = [f"model={model}", f"strategy={strategy}", *MODELS.get(model, [])]
    if strategy == "ernode":
        return out + ["strategy.inner=reversible"]
    return out + [f"strategy.solver={solver}"] + [f"strategy.{o}" for o in SOLVERS[solver]]


def train_one_step(args: list[str], tmp_path) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="fit", overrides=args)
    lightning.seed_everything(0)
    datamodule, model, _ = build(cfg)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                                limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule)
    assert trainer.global_step == 1


# Every solver on the first two models (the torchdiffeq rule is model-independent); a fixed-step
# and an adaptive one on the others.
CELL_SOLVERS = {m: list(SOLVERS) if m in ("ode_classifier", "cnf") else ["midpoint", "dopri5"] for m in MODELS}
# ernode and auto wrap or choose among the others, whose solvers are covered: one cell each per model
CELLS = [(m, s, v) for m in MODELS for s in STRATEGIES for v in (["rk4"] if s in ("ernode", "auto") else CELL_SOLVERS[m])]
CELLS += [("bogus_model", "direct", "rk4"), ("ode_classifier", "bogus_strategy", "rk4")]


@pytest.mark.parametrize("model, strategy, solver", CELLS)
def test_cell(model, strategy, solver, tmp_path):
    error = expected(model, strategy, solver)
    if error is None:
        train_one_step(overrides(model, strategy, solver), tmp_path)
        return
    with pytest.raises((ValueError, TypeError, MissingConfigException, Exception)) as info:
        train_one_step(overrides(model, strategy, solver), tmp_path)
    assert re.search(error, str(info.value)), str(info.value)
    if "Could not find" in error:  # the message lists the valid names
        assert "Available options" in str(info.value)
