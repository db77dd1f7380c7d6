"""``LatentODE`` scored with a Laplace likelihood: only the ``loss`` hook changes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nde_zoo.datamodules.irregular import IrregularBatch
from nde_zoo.models import LatentODE
from nde_zoo.models.latent_ode import Posterior


class LaplaceLatentODE(LatentODE):
    """A latent ODE whose observations are Laplace-distributed around the decoder's output.

    The scale ``b = obs_std / sqrt(2)`` gives the same variance as the Gaussian it replaces;
    the heavier tails make the fit robust to outlying measurements. The encoder, the decoder,
    the gradient strategies, training, logging and the end-of-fit picture are inherited.
    """

    config_name = "laplace_latent_ode"

    def loss(
        self, batch: IrregularBatch, predicted: Tensor, posterior: Posterior, kl_weight: float = 1.0
    ) -> dict[str, Tensor]:
        b = self.obs_std / math.sqrt(2.0)
        m = batch.mask.to(predicted.dtype)
        log_lik = ((-(batch.values - predicted).abs() / b - math.log(2 * b)) * m).sum(dim=(1, 2))
        mean, std = posterior
        kl = (0.5 * (mean.pow(2) + std.pow(2) - 1.0) - torch.log(std)).sum(dim=1)
        count = m.sum().clamp_min(1.0)
        return {
            "loss": -(log_lik - kl_weight * kl).sum() / count,
            "elbo": log_lik - kl,
            "log_likelihood": log_lik,
            "kl": kl,
        }
