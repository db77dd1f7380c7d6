"""LightningDataModules; every model has an embedded default that needs no download."""

from nde_zoo.datamodules.cde_spirals import CDESpiralsDataModule
from nde_zoo.datamodules.density_tabular import DensityTabularDataModule
from nde_zoo.datamodules.digits import DigitsDataModule
from nde_zoo.datamodules.files import IrregularFileDataModule, PointsFileDataModule, SeriesFileDataModule
from nde_zoo.datamodules.mnist import MNISTDataModule
from nde_zoo.datamodules.pde import PDEDataModule
from nde_zoo.datamodules.physionet import PhysioNetDataModule
from nde_zoo.datamodules.sde_series import SDESeriesDataModule
from nde_zoo.datamodules.speech_commands import SpeechCommandsDataModule
from nde_zoo.datamodules.spirals import SpiralsDataModule
from nde_zoo.datamodules.toy2d import Toy2DDataModule
from nde_zoo.datamodules.uea import UEADataModule

__all__ = [
    "CDESpiralsDataModule",
    "DensityTabularDataModule",
    "DigitsDataModule",
    "IrregularFileDataModule",
    "MNISTDataModule",
    "PDEDataModule",
    "PhysioNetDataModule",
    "PointsFileDataModule",
    "SDESeriesDataModule",
    "SeriesFileDataModule",
    "SpeechCommandsDataModule",
    "SpiralsDataModule",
    "Toy2DDataModule",
    "UEADataModule",
]
