"""What every picture of the zoo says in its title, and when the NFE picture is worth drawing.

A picture's title names the model, the gradient strategy and the solver *as run*: an SDE names
torchsde's method and the fixed step it really took (not the ODE solver in the strategy's
settings), ``strategy=auto`` names the candidate it chose, ``ernode`` its inner strategy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["model_label", "solver_as_run", "run_title", "nfe_varies", "pyplot"]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None without matplotlib (the ``[plots]`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def model_label(model: Any) -> str:
    """``CNF (model=cnf)``."""
    name = getattr(model, "config_name", "") or ""
    return f"{type(model).__name__}" + (f" (model={name})" if name else "")


def _stepping(strategy: Any) -> str:
    stepping = getattr(strategy, "stepping", None)
    if stepping is None:
        return ""
    if stepping.steps is not None:
        return f"{stepping.steps} fixed steps"
    if stepping.step_size is not None:
        return f"fixed step {stepping.step_size:g}"
    return f"adaptive, rtol={stepping.rtol or 1e-3:g}, atol={stepping.atol or 1e-6:g}"


def solver_as_run(strategy: Any, sde: Mapping[str, Any] | None = None) -> str:
    """``strategy=reversible, rk4, 4 fixed steps``; for an SDE solve (``sde``: a Solution's
    ``extras["sde"]``) ``strategy=direct, torchsde midpoint, fixed dt=0.0625``."""
    name = getattr(strategy, "name", "") or type(strategy).__name__
    if sde:
        return f"strategy={name}, torchsde {sde.get('method')}, fixed dt={float(sde.get('dt')):g}"
    inner = getattr(strategy, "inner", None)
    if inner is not None and name == "ernode":
        return f"strategy=ernode around {solver_as_run(inner)}"
    chosen = getattr(strategy, "chosen", None) if name == "auto" else None
    tableau = getattr(strategy, "tableau", None)
    parts = [
        f"strategy={name}"
        + (f" (chose {getattr(chosen, 'name', '') or type(chosen).__name__})" if chosen is not None else "")
    ]
    if tableau is not None:
        parts.append(tableau.name)
    if _stepping(strategy):
        parts.append(_stepping(strategy))
    compile_spec = getattr(strategy, "compile", None)
    if getattr(compile_spec, "enabled", False):
        parts.append("compiled")
    return ", ".join(parts)


def run_title(model: Any, what: str = "", sde: Mapping[str, Any] | None = None) -> str:
    """``CNF (model=cnf) with strategy=reversible, rk4, 4 fixed steps: what``."""
    title = f"{model_label(model)} with {solver_as_run(model.strategy, sde)}"
    return f"{title}: {what}" if what else title


def nfe_varies(
    history: Sequence[Mapping[str, float]], keys: Sequence[str] = ("nfe/forward", "nfe/backward")
) -> bool:
    """Whether any of ``keys`` takes more than one value over ``history`` (a strategy's per-step figures)."""
    return any(len({h.get(k) for h in history if k in h}) > 1 for k in keys)
