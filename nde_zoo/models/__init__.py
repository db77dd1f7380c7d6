"""LightningModules: a NeuralDE base and one file per model family."""

from nde_zoo.models.base import NeuralDE
from nde_zoo.models.cnf import CNF
from nde_zoo.models.latent_ode import LatentODE
from nde_zoo.models.ode_classifier import ODEClassifier

__all__ = ["CNF", "LatentODE", "NeuralDE", "ODEClassifier"]
