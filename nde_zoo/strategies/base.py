"""The contract between models and gradient strategies.

A :class:`GradientStrategy` turns ``(field, y0, ts)`` into a :class:`Solution` whose
``ys`` is differentiable with respect to ``y0`` and the field's parameters *by that
strategy's own method*. It is a ``lightning.Callback``: the model owns it and returns it
from ``configure_callbacks()``, and it logs its own figures (NFE, memory) per training step.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field as dataclass_field
from typing import Any, ClassVar

import lightning
import torch
from torch import Tensor, nn

from nde_zoo.solvers import ButcherTableau, Path, SolveStats, Stepping, get_tableau
from nde_zoo.solvers.stepping import DEFAULT_MAX_STEPS

__all__ = ["Solution", "GradientStrategy", "ODEStrategy", "SavedBytes", "field_parameters"]


@dataclass
class Solution:
    """The result of a solve.

    Attributes:
        ys: the state at each output time, shape ``(len(ts), batch, *state)``.
        ts: the output times, shape ``(len(ts),)``.
        stats: forward NFE, accepted/rejected steps; ``nfe_backward`` is filled in by
            ``backward()``; ``saved_bytes`` is what autograd keeps alive for backward.
        path: the accepted step times (plain floats), when the strategy ran our solver core.
    """

    ys: Tensor
    ts: Tensor
    stats: SolveStats
    path: Path | None = None
    saved_bytes: int = 0
    extras: dict[str, Any] = dataclass_field(default_factory=dict)


class SavedBytes:
    """Counts the bytes autograd saves for backward inside a ``with`` block.

    Uses ``torch.autograd.graph.saved_tensors_hooks``; storages are counted once each,
    however many operations save them (a weight used by every step counts once).
    """

    def __init__(self) -> None:
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def field_parameters(field: Any) -> list[nn.Parameter]:
    """The trainable parameters of a field (an ``nn.Module``), or none for a plain function."""
    if isinstance(field, nn.Module):
        return [p for p in field.parameters() if p.requires_grad]
    return []


class GradientStrategy(lightning.Callback, abc.ABC):
    """How a model's gradient through a differential equation solve is computed.

    Subclasses declare ``kinds`` (``"ode"`` and/or ``"sde"``) and implement :meth:`solve`.
    As a Lightning callback a strategy logs ``nfe/forward``, ``nfe/backward`` and
    ``memory/saved_bytes`` (CPU) or ``memory/cuda_peak_bytes`` (GPU) each training step,
    and keeps whatever it schedules in :meth:`state_dict`.
    """

    kinds: ClassVar[frozenset[str]] = frozenset()
    #: config name, e.g. ``"reversible"`` (used in error messages and the capability matrix).
    name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> GradientStrategy:
        # Record the constructor's arguments, so the strategy can be saved as a config
        # (nde_zoo.strategies.config.strategy_config; models keep it in their hyperparameters).
        from nde_zoo.strategies.config import init_arguments

        self = super().__new__(cls)
        self._init_arguments = init_arguments(cls, args, kwargs)
        return self

    def __init__(self) -> None:
        super().__init__()
        self._solutions: list[Solution] = []
        #: the figures logged at each training step (``{"step": ..., "nfe/forward": ...}``),
        #: kept for plots at the end of ``fit``.
        self.history: list[dict[str, float]] = []

    @abc.abstractmethod
    def solve(self, field: Any, y0: Tensor, ts: Tensor) -> Solution:
        """Solve ``dy/dt = field(t, y)`` from ``y0`` at ``ts[0]``; outputs at every ``ts``."""

    def regularisation(self, solution: Solution) -> Tensor:
        """A term to add to the training loss; zero unless the strategy adds one."""
        return solution.ys.new_zeros(())

    def _record(self, solution: Solution) -> Solution:
        """Keep a solution of this training step so its figures can be logged."""
        self._solutions.append(solution)
        return solution

    # -- Lightning callback hooks ------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return f"GradientStrategy[{type(self).__name__}]"

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._solutions.clear()
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._solutions:
            return
        figures = {
            "nfe/forward": float(sum(s.stats.nfe_forward for s in self._solutions)),
            "nfe/backward": float(sum(s.stats.nfe_backward for s in self._solutions)),
        }
        if pl_module.device.type == "cuda":
            figures["memory/cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated(pl_module.device))
        else:
            figures["memory/saved_bytes"] = float(sum(s.saved_bytes for s in self._solutions))
        pl_module.log_dict(figures, on_step=True, on_epoch=False, batch_size=1)
        self.history.append({"step": float(trainer.global_step), **figures})
        self._solutions.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ODEStrategy(GradientStrategy):
    """A strategy that runs an explicit RK method of the solver core.

    Args:
        solver: a name from :func:`nde_zoo.solvers.solver_names` or a :class:`ButcherTableau`.
        steps / step_size: fixed stepping (``steps`` uniform steps over ``[ts[0], ts[-1]]``).
        rtol / atol / max_steps: adaptive stepping (the default, ``rtol=1e-3``, ``atol=1e-6``).
    """

    kinds = frozenset({"ode"})

    def __init__(
        self,
        solver: str | ButcherTableau = "dopri5",
        *,
        steps: int | None = None,
        step_size: float | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> None:
        super().__init__()
        self.tableau = get_tableau(solver)
        self.stepping = Stepping.of(
            steps=steps, step_size=step_size, rtol=rtol, atol=atol, max_steps=max_steps
        )
        self.stepping.check(self.tableau)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(solver={self.tableau.name!r}, {self.stepping.describe()})"
