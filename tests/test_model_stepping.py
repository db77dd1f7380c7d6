"""The main job is the command users type: ``fit model=cnf strategy=reversible`` steps as
``make fit`` does, because the CNF's config carries its stepping (``stepping``: rk4, 4 steps),
and every stepping given on the command line, another strategy, or another model is respected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nde_zoo.configs_path import config_dir
from nde_zoo.shorthands import apply_model_stepping
from nde_zoo.strategies.config import strategy_config

ROOT = Path(__file__).resolve().parents[1]


def _strategy(*overrides: str):
    """The strategy ``fit`` builds for these command-line overrides, and what the model's stepping set."""
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=list(overrides))
    changed = apply_model_stepping(cfg, list(overrides))
    return instantiate(cfg.strategy), changed


def _stepping(strategy) -> tuple:
    s = strategy.stepping
    return strategy.tableau.name, s.steps, s.step_size, s.adaptive, s.rtol if s.adaptive else None


def test_the_plain_command_steps_as_make_fit_did():
    plain, changed = _strategy("model=cnf", "strategy=reversible")
    explicit, _ = _strategy("model=cnf", "strategy=reversible", "strategy.solver=rk4", "strategy.steps=4")
    assert changed == {"steps": 4, "solver": "rk4"}
    assert _stepping(plain) == ("rk4", 4, None, False, None)
    assert strategy_config(plain) == strategy_config(explicit)


@pytest.mark.parametrize("overrides, expected", [
    (["strategy.steps=8"], ("rk4", 8, None, False, None)),              # the model's solver, your steps
    (["strategy.step_size=0.125"], ("rk4", None, 0.125, False, None)),
    (["strategy.solver=midpoint"], ("midpoint", 4, None, False, None)),  # your solver, the model's steps
    (["strategy.rtol=1e-5"], ("dopri5", None, None, True, 1e-5)),       # adaptive: the strategy's own solver
    (["strategy.steps=null"], ("dopri5", None, None, True, 1e-3)),      # back to every config's default
    (["strategy.solver=tsit5", "strategy.atol=1e-8"], ("tsit5", None, None, True, 1e-3)),
])
def test_the_command_lines_stepping_wins(overrides, expected):
    strategy, _ = _strategy("model=cnf", "strategy=reversible", *overrides)
    assert _stepping(strategy) == expected


@pytest.mark.parametrize("name", ["direct", "checkpoint", "symplectic", "auto"])
def test_every_exact_strategy_gets_the_cnfs_stepping(name):
    strategy, _ = _strategy("model=cnf", f"strategy={name}")
    assert _stepping(strategy)[:4] == ("rk4", 4, None, False)


def test_ernodes_inner_strategy_gets_it_and_torchdiffeqs_strategies_keep_their_own():
    ernode, _ = _strategy("model=cnf", "strategy=ernode")
    assert _stepping(ernode.inner)[:4] == ("rk4", 4, None, False)
    for name in ("adjoint", "seminorm"):  # torchdiffeq has no classic rk4: their adaptive default stands
        strategy, changed = _strategy("model=cnf", f"strategy={name}")
        assert changed == {} and _stepping(strategy) == ("dopri5", None, None, True, 1e-3)
    seminorm, _ = _strategy("model=cnf", "strategy=seminorm", "strategy.solver=rk38")
    assert _stepping(seminorm)[:4] == ("rk38", 4, None, False)


OTHER_MODELS = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml") if p.stem != "cnf")


@pytest.mark.parametrize("model", OTHER_MODELS)
def test_other_models_are_unchanged(model):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=[f"model={model}", "strategy=reversible"])
    before = OmegaConf.to_container(cfg.strategy)
    assert apply_model_stepping(cfg, [f"model={model}", "strategy=reversible"]) == {}
    assert OmegaConf.to_container(cfg.strategy) == before


def test_make_fit_runs_the_plain_command():
    args = re.search(r"^ARGS\s*\?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert args == ["model=cnf", "strategy=reversible"]


def test_the_cli_says_which_stepping_it_took_and_saves_it(cli, tmp_path):
    run = tmp_path / "run"
    out = cli("fit", "model=cnf", "strategy=reversible", "trainer.max_steps=1", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "logger=none",
              "model.baseline_components=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "the model's stepping: steps=4, solver=rk4" in text, text[-3000:]
    assert "Reversible(solver='rk4', steps=4" in text
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert (saved.strategy.solver, saved.strategy.steps) == ("rk4", 4)
