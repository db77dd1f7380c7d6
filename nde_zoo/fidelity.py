"""Gradient fidelity: how far a strategy's gradient is from backprop through the same solve.

``python -m nde_zoo gradcheck model=... strategy=...`` builds the model twice from the same
weights, once with the chosen strategy and once with :class:`~nde_zoo.strategies.Direct` on
the same solver and stepping, both in float64, takes one batch's loss gradient with each,
and prints the relative error per parameter group. Exact strategies (reversible,
symplectic, checkpoint) land at round-off; the continuous adjoints at their tolerance.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from nde_zoo.models.base import NeuralDE
from nde_zoo.strategies.base import GradientStrategy, ODEStrategy

__all__ = ["reference_strategy", "parameter_groups", "gradient_fidelity", "relative_error"]


def reference_strategy(strategy: GradientStrategy) -> ODEStrategy:
    """``Direct`` on the discretisation ``strategy`` uses (its inner one for a wrapper)."""
    from nde_zoo.strategies import Direct

    inner = getattr(strategy, "inner", None)
    base = inner if isinstance(inner, GradientStrategy) else strategy
    if not isinstance(base, ODEStrategy):
        raise ValueError(
            f"gradcheck compares against backprop through our solver core, which strategy "
            f"{type(strategy).__name__} does not use"
        )
    stepping = base.stepping
    return Direct(
        solver=base.tableau, steps=stepping.steps, step_size=stepping.step_size, rtol=stepping.rtol,
        atol=stepping.atol, max_steps=stepping.max_steps,
    )


def parameter_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter names grouped by top-level submodule (``embed``, ``field``, ``head``...)."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.split(".")[0], []).append(name)
    return groups


def relative_error(a: Tensor, b: Tensor) -> float:
    """``|a - b| / max(|b|, tiny)`` in the 2-norm."""
    denom = max(float(b.norm()), 1e-300)
    return float((a - b).norm()) / denom


def _gradient(model: NeuralDE, batch: Any, seed: int) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # models that sample (Hutchinson probes, q(z0)) draw the same noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer
        loss = model._common_step(batch, "val")
    loss.backward()
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters() if p.requires_grad}


def _to_float64(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple (the latent ODE's batches)
        return type(batch)(*(_to_float64(b) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_float64(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_float64(v) for k, v in batch.items()}
    return batch


def gradient_fidelity(
    build_model: Callable[[GradientStrategy], NeuralDE],
    strategy: GradientStrategy,
    batch: Any,
    seed: int = 0,
) -> dict[str, float]:
    """Relative gradient error of ``strategy`` against float64 ``Direct``, per parameter group.

    Args:
        build_model: makes the model around a given strategy (same architecture each call).
        strategy: the strategy under test.
        batch: one batch as the model's ``_common_step`` takes it.

    Returns:
        ``{group: relative error}`` plus ``"all"`` for the whole gradient.
    """
    torch.manual_seed(seed)
    model = build_model(strategy).double()
    reference = build_model(reference_strategy(strategy)).double()
    reference.load_state_dict(copy.deepcopy(model.state_dict()))
    batch = _to_float64(batch)
    got = _gradient(model, batch, seed)
    want = _gradient(reference, batch, seed)
    out = {
        group: relative_error(torch.cat([got[n].reshape(-1) for n in names]),
                              torch.cat([want[n].reshape(-1) for n in names]))
        for group, names in parameter_groups(model).items()
    }
    out["all"] = relative_error(torch.cat([g.reshape(-1) for g in got.values()]),
                                torch.cat([w.reshape(-1) for w in want.values()]))
    return out
