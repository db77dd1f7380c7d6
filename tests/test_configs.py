"""Every YAML under configs/ composes and instantiates, and its keys match its target.

Parametrised over the files themselves, so a new config is covered the day it is added.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nde_zoo.configs_path import config_dir
from nde_zoo.strategies.adjoint import ADJOINT_NORMS

CONFIGS = config_dir()
GROUP_FILES = sorted(p for p in CONFIGS.glob("*/*.yaml"))
PLUGIN_GROUPS = {"hydra"}  # launcher configs need the [slurm] extra; checked separately


def _target(node) -> type:
    module, _, attr = str(node["_target_"]).rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _objects(path: Path):
    """``(key, node)`` of each object a config file describes (model files are _global_).

    A strategy file is composed as ``strategy=<name>`` gives it: the keys its defaults list brings
    (the stepping block of configs/strategy_stepping.yaml, ERNODE's inner strategy) are its keys too.
    """
    if path.parent.name == "strategy":
        yield path.stem, _compose([f"strategy={path.stem}"]).strategy
        return
    cfg = OmegaConf.load(path)
    if path.parent.name == "model":
        yield "model", cfg.model
    elif "_target_" in cfg:
        yield path.stem, cfg
    else:  # a dict of objects (callbacks, logger)
        for key, node in cfg.items():
            if key != "defaults" and OmegaConf.is_dict(node) and "_target_" in node:
                yield key, node


def _ids(paths):
    return [str(p.relative_to(CONFIGS)) for p in paths]


@pytest.mark.parametrize("path", [p for p in GROUP_FILES if p.parent.name not in PLUGIN_GROUPS],
                         ids=_ids([p for p in GROUP_FILES if p.parent.name not in PLUGIN_GROUPS]))
def test_keys_match_the_constructor(path):
    """Drift test: YAML keys == constructor parameters (no missing required, no unknown)."""
    found = False
    for key, node in _objects(path):
        found = True
        cls = _target(node)
        params = inspect.signature(cls.__init__).parameters
        accepted = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        keys = {k for k in node if not (k.startswith("_") and k.endswith("_")) and k != "defaults"}
        injected = {"strategy"} if path.parent.name == "model" else set()
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            assert keys <= accepted, f"{path.name}:{key} has keys {sorted(keys - accepted)} that {cls.__name__} does not take"
        if path.parent.name in ("model", "strategy", "data"):
            required = {n for n in accepted if params[n].default is inspect.Parameter.empty} - injected
            assert required <= keys, f"{path.name}:{key} misses required {sorted(required - keys)}"
            assert keys == accepted - injected, (
                f"{path.name}:{key} should list exactly {cls.__name__}'s arguments; "
                f"missing {sorted(accepted - injected - keys)}"
            )
    if path.parent.name not in ("trainer", "logger") or path.stem not in ("none",):
        assert found or path.parent.name == "trainer", f"{path} describes no object"


def _compose(overrides: list[str], name: str = "fit"):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", ["fit", "validate", "test", "predict", "gradcheck"])
def test_primary_configs_compose(name):
    cfg = _compose([] if name in ("fit", "gradcheck") else ["ckpt_path=x.ckpt"], name)
    assert cfg.subcommand == name


def _instantiate_group(group: str, choice: str, tmp_path: Path):
    from nde_zoo.strategies import Direct

    cfg = _compose([f"{group}={choice}"])
    if group == "model":
        return instantiate(cfg.model, strategy=Direct(solver="rk4", steps=2))
    if group == "trainer":
        return instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    node = cfg[group]
    if group in ("callbacks", "logger"):
        from hydra.core.hydra_config import HydraConfig

        if choice == "tensorboard":
            pytest.importorskip("tensorboard", reason="the [loggers] extra is not installed")
        cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        return [instantiate(c) for c in node.values()]
    return instantiate(node)


def _scalars(node) -> dict:
    """The plain (non-interpolated, non-null, non-object) values a config node sets."""
    out = {}
    for key in node:
        if key.startswith("_") and key.endswith("_"):
            continue
        value = OmegaConf.to_container(node, resolve=False)[key]
        if isinstance(value, (bool, int, float, str)) and not (isinstance(value, str) and "${" in value):
            out[key] = value
    return out


def _given(obj, key: str):
    """What ``obj`` was built with for ``key``: its recorded arguments, hparams, or attribute."""
    from nde_zoo.strategies import GradientStrategy
    from nde_zoo.strategies.config import strategy_config

    if isinstance(obj, GradientStrategy):
        return strategy_config(obj)[key]
    hparams = getattr(obj, "hparams", None)
    if hparams is not None and key in hparams:
        return hparams[key]
    return getattr(obj, key)


@pytest.mark.parametrize("path", [p for p in GROUP_FILES if p.parent.name not in PLUGIN_GROUPS],
                         ids=_ids([p for p in GROUP_FILES if p.parent.name not in PLUGIN_GROUPS]))
def test_every_config_instantiates(path, tmp_path):
    """Each file builds objects of its ``_target_`` classes, with the values the file sets."""
    import lightning

    group = path.parent.name
    obj = _instantiate_group(group, path.stem, tmp_path)
    nodes = dict(_objects(path))
    if group == "trainer":
        assert isinstance(obj, lightning.Trainer)
        cfg = OmegaConf.load(path)
        for key in ("max_epochs", "max_steps", "num_nodes"):
            if key in cfg and not OmegaConf.is_interpolation(cfg, key):
                assert getattr(obj, key) == cfg[key], key
        return
    if group in ("callbacks", "logger"):
        assert len(obj) == len(nodes)
        for built, node in zip(obj, nodes.values(), strict=True):
            assert isinstance(built, _target(node)), (built, node["_target_"])
        return
    (key, node), = nodes.items()
    assert isinstance(obj, _target(node)), (type(obj), node["_target_"])
    checked = 0
    for name, value in _scalars(node).items():
        try:
            given = _given(obj, name)
        except (AttributeError, KeyError):
            continue  # kept under another name; the drift test checks the key is an argument
        if isinstance(given, os.PathLike):
            given = os.fspath(given)
        if isinstance(given, dict) and "_target_" in given:  # a strategy named by its config (ernode's inner)
            given = given["_target_"].rsplit(".", 1)[1].lower()
        assert given == value, f"{path.name}: {name} = {value!r} in the file, {given!r} in the object"
        checked += 1
    assert checked or not _scalars(node), f"{path.name}: no value it sets could be checked on the object"


def test_model_brings_its_data_and_data_can_be_overridden():
    assert _compose([]).data._target_.endswith("DigitsDataModule")
    assert _compose(["data=mnist"]).data._target_.endswith("MNISTDataModule")


def test_launcher_configs_compose_when_the_plugin_is_installed():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # slurm: one task per device on each node; local: one process per job (ddp_spawn for more)
    for launcher, tasks, nodes in (("slurm", 4, 2), ("local", 1, 1)):
        cfg = _compose([f"hydra/launcher={launcher}", "trainer.devices=4", "trainer.num_nodes=2"])
        assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.nodes) == (tasks, nodes), launcher


@pytest.mark.parametrize("norm", ADJOINT_NORMS)
def test_every_adjoint_norm_is_documented_in_its_config_and_instantiates(norm):
    line = next(li for li in (CONFIGS / "strategy" / "adjoint.yaml").read_text().splitlines()
                if li.startswith("adjoint_norm:"))
    assert re.search(rf"[#|] {norm} ", line + " "), f"configs/strategy/adjoint.yaml does not list {norm}"
    cfg = _compose(["strategy=adjoint", f"strategy.adjoint_norm={norm}"])
    assert instantiate(cfg.strategy).adjoint_norm == norm
