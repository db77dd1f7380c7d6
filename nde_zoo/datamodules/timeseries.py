"""Shared preprocessing of the Neural CDE datamodules: series in, path knots out.

Each CDE datamodule returns raw series (``(length_i, channels)`` arrays of any length, NaN
where a value is missing) and labels; :class:`SeriesDataModule` turns them into the knots
of the control path ``X`` the way Kidger et al. (2020, "Neural Controlled Differential
Equations for Irregular Time Series") do:

1. drop a fraction ``missing_rate`` of each series' observations at random (whole time
   points, all channels; fixed by ``seed``) to make the series irregular;
2. standardise each value channel with the training split's mean and std (NaNs ignored);
3. optionally append an *observational intensity* channel per value channel: the running
   count of observations so far (``intensity=True``; it tells the model where data was);
4. fill missing values: linear interpolation in time between the nearest observations
   (leading gaps take the first observation); the Neural CDE then sees no NaN;
5. prepend *time as a channel*: ``t_i = i / (L - 1)`` for the ``L`` knots of the longest
   series (or the series' own observation times, when the data has them);
6. pad variable-length series to the longest by **filling forward** the last knot (time
   channel included), as Kidger et al. do: the path is constant after a series ends, so
   ``dX/dt = 0`` there and the CDE's state stays at its value at the series' own end.

The batches are ``(x, y)`` with ``x`` of shape ``(batch, L, 1 + C [+ C])``: channel 0 time,
then the values, then the intensities. The model turns ``x`` into an interpolation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from nde_zoo.datamodules.base import SplitDataModule

__all__ = ["SeriesDataModule", "drop_observations", "fill_missing", "pad_forward", "series_to_knots"]

log = logging.getLogger("nde_zoo")


def drop_observations(series: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``series`` ``(length, C)`` with ``round(rate * length)`` random time points set to NaN.

    At least one time point is kept, so every series keeps an observation.
    """
    out = np.array(series, dtype=np.float64, copy=True)
    length = len(out)
    n_drop = min(int(round(rate * length)), length - 1)
    if n_drop > 0:
        out[rng.choice(length, size=n_drop, replace=False)] = np.nan
    return out


def fill_missing(series: np.ndarray) -> np.ndarray:
    """Fill NaNs per channel: linear interpolation inside, nearest observation at the ends.

    A channel with no observation at all becomes zeros (the standardised mean).
    """
    out = np.array(series, dtype=np.float64, copy=True)
    index = np.arange(len(out))
    for c in range(out.shape[1]):
        observed = ~np.isnan(out[:, c])
        if observed.all():
            continue
        if not observed.any():
            out[:, c] = 0.0
            continue
        out[:, c] = np.interp(index, index[observed], out[observed, c])  # constant beyond the ends
    return out


def pad_forward(series: np.ndarray, length: int) -> np.ndarray:
    """Pad ``(length_i, C)`` to ``(length, C)`` by repeating the last row (fill-forward)."""
    if len(series) > length:
        raise ValueError(f"a series of length {len(series)} is longer than the padding length {length}")
    if len(series) == length:
        return series
    return np.concatenate([series, np.repeat(series[-1:], length - len(series), axis=0)], axis=0)


def series_to_knots(
    series: np.ndarray, length: int, intensity: bool, times: np.ndarray | None = None
) -> np.ndarray:
    """One standardised series ``(length_i, C)`` with NaNs -> knots ``(length, 1 + C [+ C])``.

    ``times`` are the observation times ``(length_i,)`` already scaled to ``[0, 1]``; by default
    the grid ``i / (length - 1)``.
    """
    n = len(series)
    t = (
        np.arange(n, dtype=np.float64) / max(length - 1, 1)
        if times is None
        else np.asarray(times, np.float64)
    )
    parts = [t[:, None], fill_missing(series)]
    if intensity:
        parts.append(np.cumsum(~np.isnan(series), axis=0).astype(np.float64))
    return pad_forward(np.concatenate(parts, axis=1), length)


class SeriesDataModule(SplitDataModule):
    """Serves labelled series as Neural CDE path knots; subclasses implement :meth:`load`.

    Args:
        batch_size: series per batch.
        val_fraction: part of the training split held out for validation.
        test_fraction: part held out for testing when the data has no official test split.
        missing_rate: fraction of each series' observations dropped at random (0: none).
        intensity: append the observational-intensity channels.
        seed: fixes the split and the dropped observations.
    """

    def __init__(
        self,
        batch_size: int,
        val_fraction: float,
        test_fraction: float,
        missing_rate: float,
        intensity: bool,
        seed: int,
    ) -> None:
        super().__init__(batch_size)
        if not 0.0 <= missing_rate < 1.0:
            raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate}")
        if not (
            0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0
        ):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum to "
                "less than 1"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.missing_rate = missing_rate
        self.intensity = intensity
        self.seed = seed
        self.classes: list[str] = []

    # -- what a subclass provides ------------------------------------------------------------
    def load(self) -> tuple[list[np.ndarray], Sequence, list[np.ndarray] | None, Sequence | None]:
        """``(train_series, train_labels, test_series, test_labels)``; each series ``(length_i, C)``.

        ``test_series`` is ``None`` when the data has no official test split (then
        ``test_fraction`` of the training data is held out).
        """
        raise NotImplementedError

    def source(self) -> str:
        """Where :meth:`load` reads from, for the log line on load (a file, a folder, an embedded copy)."""
        return f"{type(self).__name__}.load()"

    def observation_times(self, split: str, index: int) -> np.ndarray | None:
        """Times of series ``index`` of ``split`` (``"train"``/``"test"``, as :meth:`load` returned them),
        scaled to ``[0, 1]``; ``None`` (the default) for the knot grid ``i / (L - 1)``."""
        return None

    # -- preprocessing -----------------------------------------------------------------------
    def make_splits(self) -> dict[str, TensorDataset]:
        train_x, train_y, test_x, test_y = self.load()
        if len(train_x) == 0:
            raise ValueError(f"{type(self).__name__} loaded an empty training split")
        train_t = [self.observation_times("train", i) for i in range(len(train_x))]
        test_t = [self.observation_times("test", i) for i in range(len(test_x))] if test_x is not None else []
        n_train = len(train_x)
        if test_x is None:
            perm = np.random.default_rng(self.seed).permutation(n_train)
            n_test = int(round(self.test_fraction * n_train))
            test_idx, train_idx = perm[:n_test], perm[n_test:]
            test_x, test_y, test_t = ([seq[i] for i in test_idx] for seq in (train_x, train_y, train_t))
            train_x, train_y, train_t = ([seq[i] for i in train_idx] for seq in (train_x, train_y, train_t))
            n_train = len(train_x)
        labels = [str(v) for v in list(train_y) + list(test_y)]
        self.classes = sorted(set(labels), key=lambda s: (len(s), s) if s.isdigit() else (0, s))
        lookup = {c: i for i, c in enumerate(self.classes)}
        y = np.array([lookup[v] for v in labels], dtype=np.int64)
        everything = [np.asarray(s, dtype=np.float64) for s in list(train_x) + list(test_x)]
        channels = {s.shape[1] for s in everything}
        if len(channels) != 1 or any(s.ndim != 2 or len(s) == 0 for s in everything):
            raise ValueError(
                f"{type(self).__name__}: every series must be a non-empty (length, channels) array with the "
                f"same channels; found channel counts {sorted(channels)}"
            )
        times = list(train_t) + list(test_t)
        missing = [int(np.isnan(s).sum()) for s in everything]  # in the data as read
        if self.missing_rate > 0:
            drop_rng = np.random.default_rng([self.seed, 1])
            everything = [drop_observations(s, self.missing_rate, drop_rng) for s in everything]
        self._log_load(everything, missing, n_train, next(iter(channels)), times)
        stacked = np.concatenate(everything[:n_train], axis=0)
        mean, std = np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        length = max(len(s) for s in everything)
        knots = np.stack([
            series_to_knots((s - mean) / std, length, self.intensity, t)
            for s, t in zip(everything, times, strict=True)
        ])
        x = torch.from_numpy(knots.astype(np.float32))
        yt = torch.from_numpy(y)
        perm = np.random.default_rng([self.seed, 2]).permutation(n_train)
        n_val = int(round(self.val_fraction * n_train))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        test_idx = np.arange(n_train, len(everything))
        return {
            "train": TensorDataset(x[fit_idx], yt[fit_idx]),
            "val": TensorDataset(x[val_idx], yt[val_idx]),
            "test": TensorDataset(x[test_idx], yt[test_idx]),
        }

    def _log_load(self, series: list[np.ndarray], missing: list[int], n_train: int, channels: int,
                  times: list[np.ndarray | None]) -> None:
        """One line: what was read, and what was filled (or dropped by ``missing_rate``)."""
        lengths = [len(s) for s in series]
        total = sum(lengths) * channels
        dropped = sum(int(np.isnan(s).sum()) for s in series) - sum(missing)
        never = sum(int(np.isnan(s).all(axis=0).sum()) for s in series)
        filled = sum(missing) + dropped
        knots = 1 + channels * (2 if self.intensity else 1)
        log.info(
            "%s read %d series (%d train, %d test) of %d channel(s), lengths %d-%d, %d classes, from %s; "
            "times: %s; missing values in the data: %d of %d, in %d series%s; %s; the path has %d channels "
            "(model.in_channels=%d)",
            type(self).__name__, len(series), n_train, len(series) - n_train, channels, min(lengths),
            max(lengths),
            len(self.classes), self.source(),
            "the series' own" if any(t is not None for t in times) else "the knot grid i / (L - 1)",
            sum(missing), total, sum(1 for m in missing if m),
            f"; missing_rate={self.missing_rate:g} dropped {dropped} more" if dropped else "",
            (f"filled {filled} by linear interpolation in time (the nearest observation before the first "
             f"and after the last)" + (f", and {never} channel(s) of a series never observed with 0"
                                       if never else "")) if filled else "nothing to fill",
            knots, knots,
        )

    @property
    def num_channels(self) -> int:
        """Channels of the path knots: time, values, intensities."""
        return int(self.get_split("train").tensors[0].shape[-1])

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)
