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
from nde_zoo.strategies.base import GradientStrategy, ODEStrategy, Solution

__all__ = ["reference_strategy", "parameter_groups", "gradient_fidelity", "relative_error"]


def reference_strategy(strategy: GradientStrategy) -> GradientStrategy:
    """Backprop (float64 autograd) through the discretisation ``strategy`` uses.

    ``Direct`` on the same tableau and stepping for the strategies that run the plain RK
    recursion (or torchdiffeq's); autograd through the coupled reversible recursion for
    :class:`~nde_zoo.strategies.Reversible` (its own discretisation, not the base method's);
    for :class:`~nde_zoo.strategies.LocalERNODE`, the same wrapper (same settings, schedule
    position and random state, so it samples the same ``t_reg`` and solves the same grid)
    around the reference of its inner strategy.
    """
    from nde_zoo.strategies import Direct, LocalERNODE, Reversible

    if isinstance(strategy, LocalERNODE):
        wrapper = LocalERNODE(
            reference_strategy(strategy.inner), sampling=strategy.sampling, coef_start=strategy.coef_start,
            coef_end=strategy.coef_end, decay_steps=strategy.decay_steps,
            error_solver=strategy.error_tableau.name, seed=strategy.seed,
        )
        wrapper.step = strategy.step
        wrapper.rng.setstate(strategy.rng.getstate())
        wrapper._previous_times = list(strategy._previous_times)
        return wrapper
    inner = getattr(strategy, "inner", None)
    base = inner if isinstance(inner, GradientStrategy) else strategy
    if not isinstance(base, ODEStrategy):
        raise ValueError(
            f"gradcheck compares against backprop through our solver core, which strategy "
            f"{type(strategy).__name__} does not use; compare it yourself with "
            f"nde_zoo.fidelity.gradient_fidelity(build_model, strategy, batch, reference=<a strategy on the "
            f"same discretisation, e.g. Direct(solver, steps=N)>): docs/extending.md ('A new gradient "
            f"strategy') shows it, with examples/extending/new_strategy.py"
        )
    stepping = base.stepping
    kwargs = dict(steps=stepping.steps, step_size=stepping.step_size, rtol=stepping.rtol, atol=stepping.atol,
                  max_steps=stepping.max_steps)
    if isinstance(base, Reversible):
        return _BackpropReversible(base.tableau, coupling=base.coupling, **kwargs)
    return Direct(solver=base.tableau, **kwargs)


class _BackpropReversible(ODEStrategy):
    """Plain autograd through the reversible strategy's coupled recursion (its reference)."""

    name = "backprop_reversible"

    def __init__(self, solver: Any, *, coupling: float, **stepping: Any) -> None:
        super().__init__(solver, **stepping)
        self.coupling = coupling

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Any = None) -> Solution:
        from nde_zoo.strategies.reversible import ReversibleScheme

        scheme = ReversibleScheme(self.tableau, self.coupling)
        scheme.keeps = "graph"  # the coupled recursion with its graph: the reference backpropagates through it
        ys, stats, path = self.drive(scheme, field, y0, ts)
        return Solution(ys, ts, stats, path)


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


def _gradient(model: NeuralDE, batch: Any, seed: int, stage: str = "val") -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # models that sample (Hutchinson probes, q(z0)) draw the same noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer
        loss = model._common_step(batch, stage)
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
    *,
    reference: GradientStrategy | None = None,
    stage: str = "val",
) -> dict[str, float]:
    """Relative gradient error of ``strategy`` against float64 ``Direct``, per parameter group.

    Args:
        build_model: makes the model around a given strategy (same architecture each call).
        strategy: the strategy under test.
        batch: one batch as the model's ``_common_step`` takes it.
        reference: what to compare against (default :func:`reference_strategy`); e.g. a
            tight-tolerance ``Direct`` to see the discretisation error instead.
        stage: the ``_common_step`` stage whose loss is differentiated: ``"val"`` (the task
            loss) or ``"train"`` (plus the strategy's regulariser, e.g. LocalERNODE's).

    Returns:
        ``{group: relative error}`` plus ``"all"`` for the whole gradient.
    """
    torch.manual_seed(seed)
    model = build_model(strategy).double()
    reference = reference if reference is not None else reference_strategy(strategy)
    reference_model = build_model(reference).double()
    reference_model.load_state_dict(copy.deepcopy(model.state_dict()))
    batch = _to_float64(batch)
    got = _gradient(model, batch, seed, stage)
    want = _gradient(reference_model, batch, seed, stage)
    out = {
        group: relative_error(torch.cat([got[n].reshape(-1) for n in names]),
                              torch.cat([want[n].reshape(-1) for n in names]))
        for group, names in parameter_groups(model).items()
    }
    out["all"] = relative_error(torch.cat([g.reshape(-1) for g in got.values()]),
                                torch.cat([w.reshape(-1) for w in want.values()]))
    return out
