"""A classifier whose ODE block integrates a gated field ``sigmoid(g(z)) * f(t, z)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nde_zoo.models import ODEClassifier
from nde_zoo.models.ode_classifier import MLPField


class GatedField(nn.Module):
    def __init__(self, state_dim: int, width: int) -> None:
        super().__init__()
        self.inner = MLPField(state_dim, width)
        self.gate = nn.Linear(state_dim, state_dim)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return torch.sigmoid(self.gate(z)) * self.inner(t, z)


class GatedClassifier(ODEClassifier):
    """``ODEClassifier`` with a gated vector field: only the ``vector_field`` hook changes."""

    config_name = "gated_classifier"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gated = GatedField(self.field.out.out_features, self.field.hidden.out_features)

    def vector_field(self) -> nn.Module:
        return self.gated
