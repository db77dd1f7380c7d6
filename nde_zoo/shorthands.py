"""Top-level shorthands of the command line that stand for a key inside a config group.

``memory_budget=20MB`` is ``strategy.memory_budget=20MB`` of ``strategy=auto`` (or of ERNODE's inner
``auto``), the same spelling in ``plan`` and ``fit`` (and ``validate``/``test``/``predict``).

A model's ``stepping`` (``configs/model/cnf.yaml``) is the stepping that suits it: it fills the
strategy's ``solver`` and ``steps`` where the command line leaves them to the strategy config's
adaptive default (:func:`apply_model_stepping`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict

__all__ = ["apply_memory_budget", "apply_model_stepping", "STEPPING_KEYS"]

#: the keys that choose fixed (steps, step_size) or adaptive (rtol, atol) stepping
STEPPING_KEYS = ("steps", "step_size", "rtol", "atol")


def _strategy_name(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return str(HydraConfig.get().runtime.choices.get("strategy"))
    except (ImportError, ValueError):  # pragma: no cover
        pass
    return str(cfg.strategy.get("_target_", "?")).rpartition(".")[2].lower()


def apply_memory_budget(sub: str, cfg: DictConfig) -> None:
    """Copy the top-level ``memory_budget`` into the strategy config that has one.

    Both spellings given with different values, or ``memory_budget=`` with a strategy that has no
    budget, stop with an error naming the key (``plan`` leaves the second case to its own refusal,
    which says how to set the stepping).
    """
    budget: Any = cfg.get("memory_budget")
    if budget is None:
        return
    target = None
    if "memory_budget" in cfg.strategy:
        target = cfg.strategy
    elif isinstance(cfg.strategy.get("inner"), DictConfig) and "memory_budget" in cfg.strategy.inner:
        target = cfg.strategy.inner
    if target is None:
        if sub == "plan":
            return
        raise SystemExit(
            f"error: memory_budget={budget} is the memory budget of strategy=auto (strategy.memory_budget), "
            f"but strategy={_strategy_name(cfg)} has none; pass strategy=auto memory_budget={budget} to "
            f"choose the fastest strategy that fits it, or drop memory_budget="
        )
    own = target.get("memory_budget")
    if own is not None and str(own) != str(budget):
        key = "strategy.memory_budget" if target is cfg.strategy else "strategy.inner.memory_budget"
        raise SystemExit(
            f"error: memory_budget={budget} and {key}={own} disagree; they are the same setting, give one"
        )
    with open_dict(target):
        target.memory_budget = budget


def _command_line_overrides() -> list[str]:
    """The overrides of the running Hydra job (none outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [str(o) for o in HydraConfig.get().overrides.task]
    except (ImportError, ValueError):  # pragma: no cover
        pass
    return []


def apply_model_stepping(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fill the strategy's stepping from the model config's ``stepping`` (e.g. ``solver: rk4``,
    ``steps: 4``); returns what it set (empty: nothing).

    The strategy config that solves is ``strategy`` (or ERNODE's ``strategy.inner``). The model's
    stepping applies where the command line (``overrides``: the Hydra job's, by default) leaves it:

    - no ``steps``/``step_size``/``rtol``/``atol`` given and the strategy config sets none of them
      (every config's adaptive default): the model's fixed steps;
    - ``strategy.steps=8`` or ``strategy.step_size=``: that stepping, with the model's solver;
    - ``strategy.rtol=``/``strategy.atol=`` (or ``strategy.steps=null``): adaptive, with the
      strategy config's own solver (the model's fixed-step solver may have no error estimate);
    - ``strategy.solver=`` given: that solver, with the stepping the rules above give;
    - a strategy that refuses the model's solver (``adjoint``/``seminorm`` run torchdiffeq, which
      has no ``rk4``) keeps its own stepping.
    """
    stepping = cfg.get("stepping")
    if not stepping:
        return {}
    target, prefix = cfg.strategy, "strategy."
    if not ("solver" in target and "steps" in target):
        inner = target.get("inner")
        if not (isinstance(inner, DictConfig) and "solver" in inner and "steps" in inner):
            return {}  # a strategy without Runge-Kutta stepping
        target, prefix = inner, "strategy.inner."
    overrides = _command_line_overrides() if overrides is None else overrides
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o)
    given = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    changed: dict[str, Any] = {}
    if not given & set(STEPPING_KEYS) and all(target.get(k) is None for k in STEPPING_KEYS):
        changed = {k: stepping[k] for k in STEPPING_KEYS if stepping.get(k) is not None}
    fixed = any(changed.get(k, target.get(k)) is not None for k in ("steps", "step_size"))
    if fixed and "solver" not in given and stepping.get("solver") is not None:
        changed["solver"] = stepping.solver
    changed = {k: v for k, v in changed.items() if target.get(k) != v}
    if changed and "solver" not in given:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        trial = OmegaConf.merge(target, changed)
        try:
            instantiate(trial)
        except Exception:  # e.g. torchdiffeq's strategies and rk4: the strategy's own stepping stands
            return {}
    with open_dict(target):
        for key, value in changed.items():
            target[key] = value
    return changed
