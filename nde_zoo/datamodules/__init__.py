"""LightningDataModules; every model has an embedded default that needs no download."""

from nde_zoo.datamodules.digits import DigitsDataModule
from nde_zoo.datamodules.mnist import MNISTDataModule
from nde_zoo.datamodules.physionet import PhysioNetDataModule
from nde_zoo.datamodules.spirals import SpiralsDataModule
from nde_zoo.datamodules.toy2d import Toy2DDataModule

__all__ = ["DigitsDataModule", "MNISTDataModule", "PhysioNetDataModule", "SpiralsDataModule", "Toy2DDataModule"]
