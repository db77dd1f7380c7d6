"""nde_zoo: neural differential equations with pluggable gradient strategies."""

__version__ = "0.1.0"
