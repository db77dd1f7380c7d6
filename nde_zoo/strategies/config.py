"""A strategy as a config: what it was built with, and building it back.

Every :class:`~nde_zoo.strategies.GradientStrategy` records the arguments of its constructor
(defaults filled in) when it is created, so :func:`strategy_config` can describe it as the
same mapping a ``configs/strategy/<name>.yaml`` holds (``_target_`` plus the arguments) and
:func:`strategy_from_config` can build an equal one from it. Models save this mapping in
their hyperparameters, so a checkpoint names its own strategy.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["strategy_config", "strategy_from_config", "init_arguments", "instantiate_target"]


def _signature_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named constructor parameters of ``cls`` (a strategy's ``__signature__`` lists the
    stepping its ``**stepping`` passes on: ``nde_zoo.strategies.base.takes_stepping``)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    return {p.name: p for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def init_arguments(cls: type, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The constructor arguments of ``cls(*args, **kwargs)`` by name, defaults filled in (those of
    the base class a ``**stepping`` passes on to included).

    Empty when the positional arguments do not bind (the constructor raises its own error); an
    object being unpickled (no arguments given) gets its recorded ones back with its ``__dict__``.
    """
    params = _signature_parameters(cls)
    positional = [p for p in params.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if len(args) > len(positional):
        return {}
    out = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(zip((p.name for p in positional), args))
    out.update(kwargs)
    return out


def _is_strategy(value: Any) -> bool:
    """A gradient strategy: it recorded its constructor's arguments (``GradientStrategy.__new__``).

    Asked by attribute, not ``isinstance``: this module sits below ``base`` (which imports it),
    so it must not import ``base`` back.
    """
    return hasattr(value, "_init_arguments") and hasattr(value, "solve")


def _plain(value: Any) -> Any:
    """A config value: strategies become nested configs, OmegaConf containers plain ones."""
    if _is_strategy(value):
        return strategy_config(value)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    tableau = getattr(value, "name", None)
    if type(value).__name__ == "ButcherTableau" and isinstance(tableau, str):
        from nde_zoo.solvers.tableau import TABLEAUX

        if TABLEAUX.get(tableau) == value:  # a built-in solver: its name says it all
            return tableau
    return value


def strategy_config(strategy: Any) -> dict[str, Any]:
    """``{"_target_": "<module>.<Class>", **constructor arguments}`` of a strategy.

    Nested strategies (LocalERNODE's ``inner``) become nested configs; a solver given as a
    built-in tableau becomes its name. A strategy built without recorded arguments (a
    subclass whose ``__new__`` was replaced) gives just its ``_target_``.
    """
    cls = type(strategy)
    arguments = dict(getattr(strategy, "_init_arguments", None) or {})
    for name, value in arguments.items():  # an inner strategy given by name: save what it became
        built = getattr(strategy, name, None)
        if isinstance(value, str) and _is_strategy(built):
            arguments[name] = built
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **{k: _plain(v) for k, v in arguments.items()}}


def instantiate_target(cfg: Any, what: str = "config") -> Any:
    """Build ``cfg`` (a mapping with ``_target_``; nested ones too) by importing and calling its target.

    Works without Hydra, for the plain dicts saved in checkpoints; values without ``_target_``
    are passed as they are.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        return cfg
    path = str(cfg["_target_"])
    module, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"the {what}'s _target_ {path!r} cannot be imported ({exc})") from None
    kwargs = {k: instantiate_target(v, what) for k, v in cfg.items() if not (k.startswith("_") and k.endswith("_"))}
    return target(**kwargs)


def strategy_from_config(cfg: Any) -> Any:
    """A strategy from what :func:`strategy_config` gave (or a ``configs/strategy`` mapping)."""
    strategy = instantiate_target(cfg, "strategy")
    if not _is_strategy(strategy):
        raise TypeError(f"the strategy config {dict(cfg)!r} did not build a GradientStrategy")
    return strategy
