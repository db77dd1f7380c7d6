"""scikit-learn's 8x8 handwritten digits: the embedded default of the ODE classifier."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from nde_zoo.datamodules.tabular import ArrayDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(ArrayDataModule):
    """1797 images of 8x8 pixels (64 features), 10 classes; shipped inside scikit-learn.

    A fixed split (``seed``) into train/val/test; features standardised on the train split.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        standardise: bool = True,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed, standardise)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = load_digits()
        return data.data, data.target
