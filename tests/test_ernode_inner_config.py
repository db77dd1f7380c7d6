"""ERNODE's inner strategy is a full nested config: every argument of the
inner strategy can be set from the command line, e.g.
``strategy=ernode strategy.inner=reversible strategy.inner.solver=rk4 strategy.inner.steps=10``.
Before, the inner strategy could only be named, with its default config."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nde_zoo.cli import _inner_strategy_override
from nde_zoo.configs_path import config_dir
from nde_zoo.strategies import LocalERNODE

INNERS = ["adjoint", "checkpoint", "direct", "reversible", "seminorm", "symplectic"]


def _ernode(*args: str) -> LocalERNODE:
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=["strategy=ernode", *(_inner_strategy_override(a) for a in args)])
    return instantiate(cfg.strategy)


@pytest.mark.parametrize("inner", INNERS)
def test_every_inner_strategy_takes_its_arguments_from_the_command_line(inner):
    solver = "midpoint"
    strategy = _ernode(f"strategy.inner={inner}", f"strategy.inner.solver={solver}", "strategy.inner.steps=10",
                       "strategy.sampling=biased")
    assert type(strategy.inner).name == inner
    assert strategy.inner.stepping.steps == 10 and strategy.sampling == "biased"
    assert solver in repr(strategy.inner)


def test_hydras_own_spelling_and_tolerances():
    strategy = _ernode("strategy@strategy.inner=symplectic", "strategy.inner.rtol=1e-5")
    assert type(strategy.inner).name == "symplectic"
    assert strategy.inner.stepping.rtol == 1e-5 and strategy.inner.stepping.adaptive
    assert strategy._tolerances() == (1e-5, 1e-6)


def test_the_default_inner_is_direct_adaptive():
    strategy = _ernode()
    assert type(strategy.inner).name == "direct" and strategy.inner.stepping.adaptive


def test_sweeps_over_inner_strategies_are_rewritten_too():
    assert _inner_strategy_override("strategy.inner=direct,reversible") == "strategy@strategy.inner=direct,reversible"
    assert _inner_strategy_override("strategy.inner.steps=3") == "strategy.inner.steps=3"
    assert _inner_strategy_override("strategy.sampling=biased") == "strategy.sampling=biased"


def test_a_real_fit_with_a_configured_inner_strategy(cli, tmp_path):
    out = cli("fit", "strategy=ernode", "strategy.inner=symplectic", "strategy.inner.solver=rk4",
              "strategy.inner.steps=3", "model.state_dim=4", "model.width=8", "trainer.max_steps=2",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0",
              "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "inner=Symplectic(solver='rk4', steps=3)" in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]
