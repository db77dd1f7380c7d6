"""Shared pieces of in-memory datamodules: a fixed split and standardisation."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from nde_zoo.datamodules.base import SplitDataModule

__all__ = ["ArrayDataModule", "split_indices"]


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """A fixed permutation split into train/val/test index arrays."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum "
            f"to less than 1"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class ArrayDataModule(SplitDataModule):
    """Serves ``(x, y)`` arrays held in memory; subclasses implement :meth:`load_arrays`.

    Features are standardised with the training split's mean and standard deviation.
    """

    def __init__(
        self, batch_size: int, val_fraction: float, test_fraction: float, seed: int, standardise: bool
    ) -> None:
        super().__init__(batch_size)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.standardise = standardise

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``x`` of shape ``(n, features)`` and integer labels ``y`` of shape ``(n,)``."""
        raise NotImplementedError

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Train/val/test indices into the loaded arrays (a fixed random split by default)."""
        return split_indices(n, self.val_fraction, self.test_fraction, self.seed)

    def make_splits(self) -> dict[str, TensorDataset]:
        x, y = self.load_arrays()
        if len(x) == 0:
            raise ValueError(f"{type(self).__name__} loaded an empty dataset")
        train, val, test = self.split(len(x))
        x = x.astype(np.float32)
        if self.standardise:
            mean, std = x[train].mean(0), x[train].std(0)
            x = (x - mean) / np.where(std > 1e-8, std, 1.0)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        splits = (("train", train), ("val", val), ("test", test))
        return {name: TensorDataset(xt[idx], yt[idx]) for name, idx in splits}

    @property
    def num_features(self) -> int:
        return int(self.get_split("train").tensors[0].shape[1])
