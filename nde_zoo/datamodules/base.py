"""The one base class of every datamodule: splits held in memory, served by DataLoaders.

A new datamodule needs only its data: implement :meth:`SplitDataModule.make_splits`, returning
``{"train": ..., "val": ..., "test": ...}`` (datasets, or tensors / tuples of tensors that become
``TensorDataset``\\ s). Loading happens once, on first use; ``predict`` serves the test split; a
dataset with a ``collate`` method is batched with it. docs/extending.md shows a complete one.
"""

from __future__ import annotations

import abc
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["SplitDataModule"]

SPLITS = ("train", "val", "test")


class SplitDataModule(lightning.LightningDataModule, abc.ABC):
    """Train/val/test splits made once by :meth:`make_splits`; loaders, shuffling and batching here.

    Args:
        batch_size: examples per batch (every split).
    """

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self._splits: dict[str, Dataset] = {}

    @abc.abstractmethod
    def make_splits(self) -> dict[str, Any]:
        """``{"train": ..., "val": ..., "test": ...}``: each a ``Dataset``, a tensor or a tuple of tensors."""

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        splits = self.make_splits()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"{type(self).__name__}.make_splits() returned no {', '.join(missing)} split; "
                             f"it must return {{'train': ..., 'val': ..., 'test': ...}}")
        self._splits = {name: self._as_dataset(name, data) for name, data in splits.items()}

    @staticmethod
    def _as_dataset(name: str, data: Any) -> Dataset:
        if isinstance(data, torch.Tensor):
            return TensorDataset(data)
        if isinstance(data, tuple) and all(isinstance(t, torch.Tensor) for t in data):
            return TensorDataset(*data)
        if isinstance(data, Dataset):
            return data
        raise TypeError(
            f"split {name!r} must be a Dataset, a tensor or a tuple of tensors, got {type(data).__name__}"
        )

    def get_split(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``), made on first use."""
        self.setup()
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(self._splits)}")
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.get_split(split)
        collate = getattr(data, "collate", None)  # e.g. irregular series pad their batch
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def dataset(self, split: str) -> Dataset:
        """Same as :meth:`get_split` (a datamodule may use ``dataset`` for a constructor argument)."""
        return self.get_split(split)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
