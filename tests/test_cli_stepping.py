"""Stepping from the command line: ``strategy.steps=N`` / ``strategy.step_size=h`` switch any
strategy config to fixed steps, ``strategy.rtol=`` / ``strategy.atol=`` to adaptive; the configs
leave all four null so the defaults (adaptive, rtol 1e-3, atol 1e-6) apply in code.

A new user's first try, ``fit strategy=reversible strategy.steps=10`` used to fail with "steps=
asks for fixed steps but rtol/atol ask for adaptive steps" for every config but symplectic.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nde_zoo.configs_path import config_dir

ODE_CONFIGS = sorted(p.stem for p in (config_dir() / "strategy").glob("*.yaml")
                     if p.stem not in ("ernode", "auto"))


def _strategy(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=list(overrides))
    return instantiate(cfg.strategy)


@pytest.mark.parametrize("name", ODE_CONFIGS)
def test_steps_switches_every_strategy_to_fixed_steps(name):
    stepping = _strategy(f"strategy={name}", "strategy.steps=10").stepping
    assert (stepping.steps, stepping.step_size, stepping.adaptive) == (10, None, False)


@pytest.mark.parametrize("name", ODE_CONFIGS)
def test_step_size_switches_every_strategy_to_fixed_steps(name):
    stepping = _strategy(f"strategy={name}", "strategy.step_size=0.125").stepping
    assert (stepping.steps, stepping.step_size, stepping.adaptive) == (None, 0.125, False)


@pytest.mark.parametrize("name", ODE_CONFIGS)
def test_tolerances_stay_adaptive_and_defaults_apply_in_code(name):
    default = _strategy(f"strategy={name}").stepping
    assert default.adaptive and (default.rtol, default.atol) == (1e-3, 1e-6)
    tight = _strategy(f"strategy={name}", "strategy.rtol=1e-5").stepping
    assert tight.adaptive and (tight.rtol, tight.atol) == (1e-5, 1e-6)


def test_a_real_fit_with_steps_from_the_cli(cli, tmp_path):
    out = cli("fit", "strategy=reversible", "strategy.steps=3", "strategy.solver=rk4", "model.state_dim=4",
              "model.width=8", "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
              "trainer.num_sanity_val_steps=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps=3" in out.stdout + out.stderr
