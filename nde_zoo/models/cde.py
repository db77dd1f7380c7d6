"""Neural controlled differential equation classifier (Kidger et al., NeurIPS 2020).

A series ``x`` becomes a continuous path ``X`` through torchcde's interpolation of its knots
(time is channel 0, see :mod:`nde_zoo.datamodules.timeseries`); the hidden state solves

    z(t0) = zeta(X(t0)),    dz/dt = g_theta(z) dX/dt(t),    logits = ell(z(T)).

The right-hand side is an ordinary ODE field ``f(t, z) = g_theta(z) dX/dt(t)``, an
``nn.Module`` whose only trainable inputs are ``g_theta``'s parameters (the interpolation
coefficients are data, computed without grad), so every ODE gradient strategy applies
unchanged: direct, checkpoint, adjoint, seminorm, reversible, symplectic, ernode.

Interpolations (``interpolation=``): ``hermite`` (cubic Hermite with backward differences,
the default: smooth and causal, what adaptive solvers like), ``cubic`` (natural cubic
spline, the original paper's choice; not causal) and ``linear`` (kinks at every knot; best
with fixed steps). The solve runs over the knot index ``[0, L - 1]``: a CDE is invariant to
reparameterising time, and the observation times are in the time channel.

Not for: series whose missing values should be treated causally online (use rectilinear
interpolation, not offered here).
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn

from nde_zoo.models.base import NeuralDE
from nde_zoo.strategies.base import GradientStrategy, Solution

__all__ = ["NeuralCDE", "CDEFunc", "ControlledField", "INTERPOLATIONS", "interpolate"]

INTERPOLATIONS = ("hermite", "cubic", "linear")


def interpolate(x: Tensor, kind: str) -> Any:
    """The torchcde path through the knots ``x`` ``(batch, L, channels)``; carries no gradient."""
    try:
        import torchcde
    except ImportError as exc:  # pragma: no cover - the dev environment has it
        raise ImportError("the Neural CDE needs torchcde: pip install 'nde-zoo[cde]'") from exc
    with torch.no_grad():
        x = x.detach()
        if kind == "hermite":
            return _unaliased(torchcde.CubicSpline(torchcde.hermite_cubic_coefficients_with_backward_differences(x)))
        if kind == "cubic":
            return _unaliased(torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x)))
        if kind == "linear":
            return torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x))
    raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {kind!r}")


def _unaliased(path: Any) -> Any:
    """The spline with each coefficient buffer in its own storage.

    torchcde keeps them as views of one tensor; a compiled solve passes them to a ``scan``, which
    refuses inputs that alias each other. Same values, so eager results do not change.
    """
    for name in ("_a", "_b", "_two_c", "_three_d"):
        setattr(path, name, getattr(path, name).clone())
    return path


class CDEFunc(nn.Module):
    """``g_theta(z)``: ``(batch, hidden)`` -> ``(batch, hidden, channels)``, an MLP ending in tanh.

    ``depth`` hidden layers of ``width`` units with ReLU, as in Kidger et al.; the final tanh
    bounds the field, which keeps the CDE well-posed.
    """

    def __init__(self, channels: int, hidden_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.channels, self.hidden_dim = channels, hidden_dim
        layers: list[nn.Module] = [nn.Linear(hidden_dim, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, hidden_dim * channels))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(self.net(z)).view(z.shape[0], self.hidden_dim, self.channels)


class ControlledField(nn.Module):
    """The CDE as an ODE field: ``f(t, z) = g_theta(z) dX/dt(t)``.

    ``t`` is a 0-d tensor, ``z`` is ``(batch, hidden)``; returns ``(batch, hidden)``. The path's
    coefficients are buffers (no grad); the parameters are ``g_theta``'s only.
    """

    def __init__(self, func: CDEFunc, path: Any) -> None:
        super().__init__()
        self.func = func
        self.path = path

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and hasattr(self.path, "_three_d"):  # a torchcde CubicSpline
            dxdt = _cubic_derivative(self.path, t)  # torchcde's formula, traceable
        else:
            dxdt = self.path.derivative(t)  # (batch, channels)
        return torch.bmm(self.func(z), dxdt.unsqueeze(-1)).squeeze(-1)


def _cubic_derivative(path: Any, t: Tensor) -> Tensor:
    """``torchcde.CubicSpline.derivative`` with the interval index kept a tensor.

    torchcde indexes its knots with a 0-d index tensor (``self._t[index]``), which a compiled
    solve (``strategy.compile=true``) must turn into a Python int: a data-dependent graph break.
    ``index_select`` computes the same numbers and stays in the program.
    """
    knots = path._t
    index = torch.bucketize(t.detach(), knots.detach()).sub(1).clamp(0, path._b.size(-2) - 1).reshape(1)
    fractional = (t - knots.index_select(0, index)).reshape(())
    two_c = path._two_c.index_select(-2, index).squeeze(-2)
    three_d = path._three_d.index_select(-2, index).squeeze(-2)
    b = path._b.index_select(-2, index).squeeze(-2)
    return b + (two_c + three_d * fractional) * fractional


class NeuralCDE(NeuralDE):
    """Classify (irregular, variable-length) series with a Neural CDE.

    Args:
        strategy: any ODE gradient strategy.
        in_channels: channels of the path knots (time + values [+ intensities]); 13 for
            JapaneseVowels (1 + 12).
        num_classes: output classes (9 for JapaneseVowels).
        hidden_dim: size of the CDE state ``z``.
        width / depth: hidden layers of ``g_theta``.
        interpolation: ``hermite`` (default), ``cubic`` or ``linear``.
        field: ``g_theta``: ``z (batch, hidden_dim)`` -> ``(batch, hidden_dim, in_channels)`` (an
            ``nn.Module`` or a config with ``_target_``); None builds :class:`CDEFunc`.
        lr / weight_decay: AdamW.
        lr_final_factor: the learning rate follows a cosine from ``lr`` down to ``lr * lr_final_factor``
            over the run (1: constant).
    """

    config_name = "cde"

    def __init__(
        self,
        strategy: GradientStrategy,
        in_channels: int = 13,
        num_classes: int = 9,
        hidden_dim: int = 32,
        width: int = 64,
        depth: int = 1,
        interpolation: str = "hermite",
        lr: float = 1e-2,
        weight_decay: float = 0.5,
        lr_final_factor: float = 0.01,
        field: nn.Module | dict | None = None,
    ) -> None:
        super().__init__(strategy, lr=lr, weight_decay=weight_decay, lr_final_factor=lr_final_factor)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
            )
        if depth < 1:
            raise ValueError(f"depth must be at least 1 hidden layer, got {depth}")
        self.in_channels, self.num_classes, self.interpolation = in_channels, num_classes, interpolation
        self.initial = nn.Linear(in_channels, hidden_dim)
        self.func = self.build_field(field, lambda: CDEFunc(in_channels, hidden_dim, width, depth))
        self.head = nn.Linear(hidden_dim, num_classes)
        self.metrics = nn.ModuleDict(
            {
                stage: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train_", "val_", "test_")
            }
        )

    # hooks --------------------------------------------------------------------------------
    def vector_field(self, path: Any) -> nn.Module:
        """The ODE field ``g_theta(z) dX/dt`` over one batch's path (override to change it)."""
        return ControlledField(self.func, path)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: knots ``(batch, L, in_channels)`` -> logits ``(batch, num_classes)``."""
        return self.classify(x)[0]

    def classify(self, x: Tensor) -> tuple[Tensor, Solution]:
        """Logits and the CDE solve's :class:`Solution` (outputs at the path's start and end)."""
        if x.dim() != 3 or x.shape[-1] != self.in_channels or x.shape[1] < 2:
            raise ValueError(
                f"NeuralCDE expects knots of shape (batch, length >= 2, {self.in_channels}) (meaning batch, "
                f"time points, channels: time + values [+ intensities]), got {tuple(x.shape)}; set "
                "model.in_channels to the data's channel count"
            )
        path = interpolate(x, self.interpolation)
        ts = path.interval.to(x)  # (2,): the knot index range [0, L - 1]
        z0 = self.initial(path.evaluate(ts[0]))  # (batch, hidden_dim)
        solution = self.solve(self.vector_field(path), z0, ts)
        return self.head(solution.ys[-1]), solution

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr, mine, key in (
            ("num_channels", self.in_channels, "in_channels"),
            ("num_classes", self.num_classes, "num_classes"),
        ):
            theirs = getattr(datamodule, attr, None)
            if theirs is not None and theirs != mine:
                raise ValueError(
                    f"the data has {attr}={theirs} but model.{key}={mine}; pass model.{key}={theirs}"
                )

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=-1)

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        logits, solution = self.classify(x)
        loss = nn.functional.cross_entropy(logits, y)
        if stage == "train":  # inference pays nothing for regularisation
            loss = loss + self.strategy.regularisation(solution)
        metric = self.metrics[f"{stage}_"]
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", batch_size=len(y))
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(
            f"{stage}/nfe", float(solution.stats.nfe_forward), on_step=False, on_epoch=True, batch_size=len(y)
        )
        return loss
