"""Top-level shorthands of the command line that stand for a key inside a config group.

``memory_budget=20MB`` is ``strategy.memory_budget=20MB`` of ``strategy=auto`` (or of ERNODE's inner
``auto``), the same spelling in ``plan`` and ``fit`` (and ``validate``/``test``/``predict``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict

__all__ = ["apply_memory_budget"]


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
