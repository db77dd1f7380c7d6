"""``memory_budget=`` is one spelling in ``plan`` and ``fit``: the top-level key is strategy=auto's
``strategy.memory_budget``; with a strategy that has no budget, ``fit`` names the right key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nde_zoo.configs_path import config_dir
from nde_zoo.shorthands import apply_memory_budget


def _compose(sub: str, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(sub, overrides=list(overrides))


@pytest.mark.parametrize("sub", ["fit", "plan"])
def test_memory_budget_reaches_auto_in_fit_and_plan(sub):
    cfg = _compose(sub, "strategy=auto", "memory_budget=20MB")
    apply_memory_budget(sub, cfg)
    assert instantiate(cfg.strategy).memory_budget == 20 * 10**6


def test_memory_budget_reaches_ernodes_inner_auto():
    cfg = _compose("fit", "strategy=ernode", "strategy@strategy.inner=auto", "memory_budget=3MB")
    apply_memory_budget("fit", cfg)
    assert cfg.strategy.inner.memory_budget == "3MB"


def test_fit_with_another_strategy_names_the_key():
    cfg = _compose("fit", "strategy=direct", "memory_budget=20MB")
    with pytest.raises(SystemExit, match=r"strategy\.memory_budget.*strategy=auto memory_budget=20MB"):
        apply_memory_budget("fit", cfg)


def test_both_spellings_must_agree():
    cfg = _compose("fit", "strategy=auto", "memory_budget=20MB", "strategy.memory_budget=30MB")
    with pytest.raises(SystemExit, match="disagree"):
        apply_memory_budget("fit", cfg)
    same = _compose("fit", "strategy=auto", "memory_budget=20MB", "strategy.memory_budget=20MB")
    apply_memory_budget("fit", same)
    assert same.strategy.memory_budget == "20MB"


def test_fit_through_the_entry_point_trains_auto_with_the_budget(tmp_path, monkeypatch):
    """The function the CLI calls: ``run("fit", cfg)`` with the top-level spelling."""
    monkeypatch.chdir(tmp_path)  # outside Hydra the run directory is the working directory
    from nde_zoo.train import run

    cfg = _compose(
        "fit",
        "strategy=auto",
        "memory_budget=1GB",
        "strategy.solver=rk4",
        "strategy.steps=2",
        "model.state_dim=4",
        "model.width=8",
        "data.batch_size=64",
        "trainer.max_steps=1",
        "+trainer.limit_val_batches=1",
        "test_after_fit=false",
        "logger=none",
        "~callbacks",
    )
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_checkpointing = False
        cfg.trainer.num_sanity_val_steps = 0
    run("fit", cfg)
    assert cfg.strategy.memory_budget == "1GB"
