"""Neural ODE classifier: input -> linear embedding -> ODE block -> linear head.

The setup of Kelly et al. (2020, "Learning differential equations that are easy to solve")
and Pal et al. (ICML 2023): an MLP vector field with a 100-wide hidden layer, the
ODE solved on t in [0, 1], a linear classifier on the final state. Forward NFE at test time
is logged (``test/nfe``): it is what local ERNODE regularisation lowers.
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn

from nde_zoo.models.base import NeuralDE
from nde_zoo.strategies.base import GradientStrategy, Solution

__all__ = ["ODEClassifier", "MLPField"]


class MLPField(nn.Module):
    """``f(t, z) = W2 tanh(W1 [z, t] + b1) + b2``: time enters as an extra input channel.

    Shapes: ``z`` is ``(batch, state_dim)``, ``t`` a 0-d tensor; returns ``(batch, state_dim)``.
    """

    def __init__(self, state_dim: int, width: int = 100) -> None:
        super().__init__()
        self.hidden = nn.Linear(state_dim + 1, width)
        self.out = nn.Linear(width, state_dim)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tt = t.to(z).expand(z.shape[0], 1)
        return self.out(torch.tanh(self.hidden(torch.cat([z, tt], dim=-1))))


class ODEClassifier(NeuralDE):
    """Classify a feature vector by where an ODE carries its embedding.

    Args:
        strategy: the gradient strategy of the ODE block.
        field: the vector field ``f(t, z) -> dz/dt`` on ``(batch, state_dim)`` (an ``nn.Module`` or a
            config with ``_target_``); None builds :class:`MLPField` ``(state_dim, width)``.
        in_features: input size (64 for 8x8 digits, 784 for MNIST).
        num_classes: output classes.
        state_dim: width of the ODE state.
        width: hidden width of the MLP vector field (100, as Kelly et al. and Pal et al.).
        t1: the ODE is solved on ``[0, t1]``.
        lr / weight_decay: AdamW.
    """

    config_name = "ode_classifier"

    def __init__(
        self,
        strategy: GradientStrategy,
        in_features: int = 64,
        num_classes: int = 10,
        state_dim: int = 32,
        width: int = 100,
        t1: float = 1.0,
        lr: float = 1e-2,
        weight_decay: float = 5e-2,
        field: nn.Module | dict | None = None,
    ) -> None:
        super().__init__(strategy, lr=lr, weight_decay=weight_decay)
        self.in_features = in_features
        self.embed = nn.Linear(in_features, state_dim)
        self.field = self.build_field(field, lambda: MLPField(state_dim, width))
        self.head = nn.Linear(state_dim, num_classes)
        self.register_buffer("ts", torch.tensor([0.0, t1]), persistent=False)
        self.metrics = nn.ModuleDict(
            {
                stage: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train_", "val_", "test_")
            }
        )

    # hooks --------------------------------------------------------------------------------
    def vector_field(self) -> nn.Module:
        """The field the ODE block integrates (override to change the dynamics)."""
        return self.field

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(batch, in_features)`` -> logits ``(batch, num_classes)``."""
        return self.classify(x)[0]

    def classify(self, x: Tensor) -> tuple[Tensor, Solution]:
        """Logits ``(batch, num_classes)`` and the ODE block's :class:`Solution`."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"ODEClassifier expects inputs of shape (batch, {self.in_features}), got "
                f"{tuple(x.shape)}; set model.in_features to the data's feature count"
            )
        z0 = self.embed(x)
        solution = self.solve(self.vector_field(), z0, self.ts.to(z0))
        return self.head(solution.ys[-1]), solution

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        features = getattr(datamodule, "num_features", None)
        if features is not None and features != self.in_features:
            raise ValueError(
                f"the data gives {features} features per example but model.in_features="
                f"{self.in_features}; pass model.in_features={features}"
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
        self.log(f"{stage}/nfe", float(solution.stats.nfe_forward), on_step=False, on_epoch=True, batch_size=len(y))
        return loss
