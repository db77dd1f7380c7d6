"""A downstream project: the latent ODE with a heavy-tailed likelihood (one hook overridden)."""

from laplace_latent.models import LaplaceLatentODE

__all__ = ["LaplaceLatentODE"]
