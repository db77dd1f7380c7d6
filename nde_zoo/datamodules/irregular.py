"""Irregularly sampled time series: one record per series, batched on the union of their times.

Each series has its own observation times, and at each time only some channels may be
observed. A batch puts its series on the *union* of their observation times (sorted, each
time once) and carries masks, the choice of Rubanova et al. (2019): one ODE solve serves
the whole batch, and a series contributes to the loss only where it was observed.

The part of a series the encoder may read (``encode_mask``: the observations up to the
dataset's split time) is separated from everything the decoder is scored on (``mask``):
points in ``mask`` but not in ``encode_mask`` are extrapolation targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IrregularRecord", "IrregularBatch", "IrregularDataset", "collate_irregular"]


class IrregularRecord(NamedTuple):
    """One series.

    Attributes:
        times: ``(n,)`` strictly increasing observation times, ``>= 0``.
        values: ``(n, channels)``; entries where ``mask`` is false are ignored (set to 0).
        mask: ``(n, channels)`` bool, which channels were observed at each time.
    """

    times: Tensor
    values: Tensor
    mask: Tensor


class IrregularBatch(NamedTuple):
    """A batch of series on the union of their observation times.

    Attributes:
        times: ``(T,)`` the union of the series' observation times, strictly increasing.
        values: ``(batch, T, channels)`` observed values, 0 where unobserved.
        mask: ``(batch, T, channels)`` bool, observed (the decoder is scored on these).
        encode_mask: ``(batch, T, channels)`` bool, the observations the encoder may read
            (a subset of ``mask``: those at times ``<= t_split``).
    """

    times: Tensor
    values: Tensor
    mask: Tensor
    encode_mask: Tensor


def collate_irregular(records: Sequence[IrregularRecord], t_split: float) -> IrregularBatch:
    """Put records on the union of their times; the encoder sees observations at ``t <= t_split``."""
    if not records:
        raise ValueError("cannot collate an empty list of series")
    channels = records[0].values.shape[-1]
    times = torch.unique(torch.cat([r.times for r in records]))  # sorted, each time once
    batch, n = len(records), len(times)
    values = torch.zeros(batch, n, channels, dtype=records[0].values.dtype)
    mask = torch.zeros(batch, n, channels, dtype=torch.bool)
    for i, r in enumerate(records):
        if r.values.shape[-1] != channels:
            raise ValueError(f"series {i} has {r.values.shape[-1]} channels, series 0 has {channels}")
        idx = torch.searchsorted(times, r.times)
        values[i, idx] = torch.where(r.mask, r.values, torch.zeros_like(r.values))
        mask[i, idx] = r.mask
    encode_mask = mask & (times <= t_split)[None, :, None]
    return IrregularBatch(times, values, mask, encode_mask)


class IrregularDataset(Dataset):
    """A list of :class:`IrregularRecord` with the collate function of its split time."""

    def __init__(self, records: Sequence[IrregularRecord], t_split: float) -> None:
        self.records = list(records)
        self.t_split = t_split

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> IrregularRecord:
        return self.records[i]

    def collate(self, records: Sequence[IrregularRecord]) -> IrregularBatch:
        return collate_irregular(records, self.t_split)
