"""LightningModules: a NeuralDE base and one file per model family."""

from nde_zoo.models.base import NeuralDE
from nde_zoo.models.cde import NeuralCDE
from nde_zoo.models.cnf import CNF
from nde_zoo.models.latent_ode import LatentODE
from nde_zoo.models.ode_classifier import ODEClassifier
from nde_zoo.models.pde import PDEModel
from nde_zoo.models.sde import LatentSDE, SDEClassifier

__all__ = ["CNF", "LatentODE", "LatentSDE", "NeuralCDE", "NeuralDE", "ODEClassifier", "PDEModel", "SDEClassifier"]
