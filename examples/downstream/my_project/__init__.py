"""A downstream project: one hook overridden, the rest inherited from nde_zoo."""

from my_project.models import GatedClassifier

__all__ = ["GatedClassifier"]
