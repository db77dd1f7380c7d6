"""The strategy configs share one stepping block: configs/strategy_stepping.yaml.

Every ODE strategy file lists ``/strategy_stepping@_here_`` in its defaults, so the stepping keys
(solver, steps, step_size, rtol, atol, max_steps, compile) and their comments are written once.
What ``strategy=<name>`` composes is what the files gave when each listed the keys itself, key for
key and value for value (``EXPECTED``), also as ERNODE's inner strategy, with every stepping key
overridable from the command line; the shared file is no strategy and no config group, so neither
``strategy=`` nor Hydra's listings offer it.
"""

from __future__ import annotations

import inspect

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from nde_zoo.configs_path import config_dir
from nde_zoo.strategies.base import ODEStrategy

CONFIGS = config_dir()
SHARED = CONFIGS / "strategy_stepping.yaml"
STEPPING_KEYS = ("solver", "steps", "step_size", "rtol", "atol", "max_steps", "compile")
STEPPING = {"solver": "dopri5", "steps": None, "step_size": None, "rtol": None, "atol": None,
            "max_steps": 10000, "compile": False}

#: ``cfg.strategy`` of ``strategy=<name>``, as the strategy files composed before they shared the block
#: (checked key for key, in any order but ``_target_`` first).
EXPECTED = {
    "adjoint": {"_target_": "nde_zoo.strategies.Adjoint", **STEPPING, "adjoint_rtol": None,
                "adjoint_atol": None, "adjoint_norm": "default"},
    "auto": {"_target_": "nde_zoo.strategies.Auto", **STEPPING, "memory_budget": None,
             "candidates": ["direct", "checkpoint", "symplectic", "reversible"], "probe_steps": 8},
    "checkpoint": {"_target_": "nde_zoo.strategies.Checkpoint", **STEPPING, "snapshots": None,
                   "schedule": "uniform"},
    "direct": {"_target_": "nde_zoo.strategies.Direct", **STEPPING},
    "reversible": {"_target_": "nde_zoo.strategies.Reversible", **STEPPING, "coupling": 0.999},
    "seminorm": {"_target_": "nde_zoo.strategies.Seminorm", **STEPPING, "adjoint_rtol": None,
                 "adjoint_atol": None},
    "symplectic": {"_target_": "nde_zoo.strategies.Symplectic", **STEPPING},
}
ERNODE = {"_target_": "nde_zoo.strategies.LocalERNODE", "sampling": "unbiased", "coef_start": 2.5,
          "coef_end": 1.0, "decay_steps": 1000, "error_solver": "tsit5", "seed": 0, "compile": None}


def _strategy(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("fit", overrides=list(overrides)).strategy)


def test_every_strategy_config_is_listed():
    assert sorted(p.stem for p in (CONFIGS / "strategy").glob("*.yaml")) == sorted([*EXPECTED, "ernode"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_strategy_composes_as_before(name):
    cfg = _strategy(f"strategy={name}")
    assert cfg == EXPECTED[name]
    assert next(iter(cfg)) == "_target_"  # shown first, as before
    assert _strategy("strategy=ernode", f"strategy@strategy.inner={name}") == {**ERNODE, "inner": EXPECTED[name]}


def test_ernode_composes_as_before():
    assert _strategy("strategy=ernode") == {**ERNODE, "inner": EXPECTED["direct"]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_stepping_key_is_overridden_from_the_command_line(name):
    given = {"solver": "rk4", "steps": 4, "step_size": 0.1, "rtol": 1e-5, "atol": 1e-7, "max_steps": 50,
             "compile": True}
    assert _strategy(f"strategy={name}", *(f"strategy.{k}={v}" for k, v in given.items())) == {**EXPECTED[name], **given}
    inner = _strategy("strategy=ernode", f"strategy@strategy.inner={name}", "strategy.inner.steps=10")["inner"]
    assert inner == {**EXPECTED[name], "steps": 10}


def test_every_ode_strategy_file_includes_the_shared_block_first():
    for path in sorted((CONFIGS / "strategy").glob("*.yaml")):
        defaults = yaml.safe_load(path.read_text()).get("defaults")
        if path.stem == "ernode":
            assert defaults == [{"/strategy@inner": "direct"}, "_self_"]
        else:
            assert defaults == ["/strategy_stepping@_here_", "_self_"], path.name


def test_the_shared_block_is_odestrategys_stepping_with_a_comment_on_each_key():
    params = inspect.signature(ODEStrategy.__init__).parameters
    stepping = {n: p.default for n, p in params.items() if n == "solver" or p.kind is p.KEYWORD_ONLY}
    shared = yaml.safe_load(SHARED.read_text())
    assert shared == {"_target_": "???", **stepping} == {"_target_": "???", **STEPPING}
    lines = {li.split(":", 1)[0]: li for li in SHARED.read_text().splitlines() if li and not li.startswith(("#", " "))}
    assert all("  # " in lines[k] for k in ("_target_", *STEPPING_KEYS)), "each key keeps its comment"


def test_the_shared_block_is_not_a_strategy():
    assert not (CONFIGS / "strategy_stepping").exists()  # no config group of that name
    assert all("strategy_stepping" not in p.stem for p in (CONFIGS / "strategy").glob("*.yaml"))
    with pytest.raises(MissingConfigException) as error:
        _strategy("strategy=strategy_stepping")
    assert "Could not find 'strategy/strategy_stepping'" in str(error.value)
    assert sorted(error.value.options) == sorted([*EXPECTED, "ernode"])


def test_the_command_line_shows_the_stepping_keys_and_lists_only_strategies(cli, tmp_path):
    job = cli("fit", "--cfg", "job", "strategy=reversible", cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert yaml.safe_load(job.stdout)["strategy"] == EXPECTED["reversible"]
    shorthand = cli("fit", "--cfg", "job", "strategy=ernode", "strategy.inner=reversible", "strategy.inner.steps=10",
                    cwd=tmp_path)
    assert shorthand.returncode == 0, shorthand.stderr[-3000:]
    assert yaml.safe_load(shorthand.stdout)["strategy"]["inner"] == {**EXPECTED["reversible"], "steps": 10}
    helped = cli("fit", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert f"strategy: {', '.join(sorted([*EXPECTED, 'ernode']))}\n" in helped.stdout
    assert "strategy_stepping" not in helped.stdout
    unknown = cli("fit", "--cfg", "job", "strategy=bogus", cwd=tmp_path)
    assert unknown.returncode != 0 and "Could not find 'strategy/bogus'" in unknown.stderr
    listed = "".join(f"\t{name}\n" for name in sorted([*EXPECTED, "ernode"]))
    assert f"Available options in 'strategy':\n{listed}" in unknown.stderr
    assert "strategy_stepping" not in unknown.stderr
