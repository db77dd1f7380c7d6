"""LightningDataModules; every model has an embedded default that needs no download."""

from nde_zoo.datamodules.digits import DigitsDataModule
from nde_zoo.datamodules.mnist import MNISTDataModule

__all__ = ["DigitsDataModule", "MNISTDataModule"]
