"""Your own data from NumPy files, one datamodule per model family (recipes: docs/data.md).

- :class:`SeriesFileDataModule` (``data=series_file``, ``model=cde``): labelled series for
  classification, ``NaN`` where a value is missing, optionally with their own observation times;
- :class:`PointsFileDataModule` (``data=points_file``, ``model=cnf``): points of a density, e.g. 2-D;
- :class:`IrregularFileDataModule` (``data=irregular_file``, ``model=latent_ode``): irregularly
  sampled series, each with its own times, ``NaN`` where a channel was not observed.

Each says on load, in one log line, what it read and what it filled or dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nde_zoo.datamodules.base import SplitDataModule
from nde_zoo.datamodules.irregular import IrregularDataset, IrregularRecord
from nde_zoo.datamodules.tabular import split_indices
from nde_zoo.datamodules.timeseries import SeriesDataModule

__all__ = ["SeriesFileDataModule", "PointsFileDataModule", "IrregularFileDataModule", "load_arrays"]

log = logging.getLogger("nde_zoo")


def load_arrays(
    path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file (``np.savez(path, values=..., labels=...)``), checked by name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give your file with data.path=... (docs/data.md)")
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in required if k not in archive.files]
        if missing:
            example = ", ".join(f"{k}=..." for k in required)
            raise ValueError(
                f"{path} has arrays {sorted(archive.files)} but needs {', '.join(required)} (missing: "
                f"{', '.join(missing)}); write it with np.savez(path, {example})"
            )
        return {k: np.asarray(archive[k]) for k in (*required, *optional) if k in archive.files}


def _series_from_arrays(
    arrays: dict[str, np.ndarray], path: Path
) -> tuple[list[np.ndarray], list[Any], list[np.ndarray] | None]:
    """Split ``values (n, L, C)`` (and ``times`` ``(n, L)`` or ``(L,)``) into per-series arrays.

    A series ends at its last valid time (``times`` given: NaN times are padding) or, without times, at
    its last row with any value (rows of NaN at the end are padding).
    """
    values = np.asarray(arrays["values"], dtype=np.float64)
    labels = list(np.asarray(arrays["labels"]).tolist())
    if values.ndim == 2:  # one channel
        values = values[:, :, None]
    if values.ndim != 3 or len(values) != len(labels):
        raise ValueError(
            f"{path}: values must be (series, length, channels) with one label per series; got "
            f"values {values.shape} and {len(labels)} labels"
        )
    times = arrays.get("times")
    if times is not None:
        times = np.asarray(times, dtype=np.float64)
        if times.ndim == 1:
            times = np.broadcast_to(times, values.shape[:2])
        if times.shape != values.shape[:2]:
            raise ValueError(
                f"{path}: times must be (length,) or (series, length) = {values.shape[:2]}, got {times.shape}"
            )
    series, own_times = [], []
    for i in range(len(values)):
        if times is not None:
            valid = ~np.isnan(times[i])
            if not valid.any():
                raise ValueError(f"{path}: series {i} has no observation time")
            if not valid[: valid.sum()].all():
                raise ValueError(
                    f"{path}: series {i}'s times have NaN before its last time; NaN times may only "
                    f"pad the end of a series"
                )
            t = times[i][valid]
            if np.any(np.diff(t) <= 0):
                raise ValueError(
                    f"{path}: series {i}'s times must increase strictly, got {t[:8].tolist()} ..."
                )
            series.append(values[i][valid])
            own_times.append(t)
        else:
            rows = np.flatnonzero(~np.isnan(values[i]).all(axis=1))
            if len(rows) == 0:
                raise ValueError(f"{path}: series {i} has no observed value")
            series.append(values[i][: rows[-1] + 1])
    return series, labels, (own_times if times is not None else None)


class SeriesFileDataModule(SeriesDataModule):
    """Labelled series from ``.npz`` files, for the Neural CDE (``model=cde``).

    The file holds ``values`` ``(series, length, channels)`` with ``NaN`` for a missing value (and
    for the padding after a shorter series ends), ``labels`` ``(series,)`` (numbers or strings) and,
    optionally, ``times`` ``(length,)`` or ``(series, length)``: each series' own observation times
    (``NaN`` after it ends), used as the path's time channel, scaled to ``[0, 1]`` over the whole
    data set. Without ``times`` the series are on the knot grid ``i / (L - 1)``. Missing values are
    filled by linear interpolation in time, as for every CDE datamodule
    (:mod:`nde_zoo.datamodules.timeseries`); the log line on load says how many.

    Args:
        path: the training file (``.npz``).
        test_path: a test file of the same layout; ``None``: ``test_fraction`` of ``path`` is held out.
        batch_size / val_fraction / test_fraction / missing_rate / intensity / seed: see
            :class:`~nde_zoo.datamodules.timeseries.SeriesDataModule`.

    The model's ``in_channels`` is ``1 + channels`` (time first), ``1 + 2 * channels`` with
    ``intensity=True``; ``num_classes`` the number of distinct labels.
    """

    def __init__(
        self,
        path: str,
        test_path: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        missing_rate: float = 0.0,
        intensity: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size, val_fraction, 0.0 if test_path else test_fraction, missing_rate, intensity, seed
        )
        self.path = Path(path).expanduser()
        self.test_path = Path(test_path).expanduser() if test_path else None
        self._times: dict[str, list[np.ndarray]] = {}

    def source(self) -> str:
        return str(self.path) + (f" and {self.test_path}" if self.test_path else "")

    def load(self):
        train_x, train_y, train_t = _series_from_arrays(
            load_arrays(self.path, ("values", "labels"), ("times",)), self.path
        )
        test_x = test_y = test_t = None
        if self.test_path is not None:
            test_x, test_y, test_t = _series_from_arrays(
                load_arrays(self.test_path, ("values", "labels"), ("times",)), self.test_path
            )
        if self.test_path is not None and (train_t is None) != (test_t is None):
            raise ValueError(f"{self.path} and {self.test_path}: give times in both files or in neither")
        if train_t is not None:
            every = [t for t in (*train_t, *(test_t or []))]
            lo, hi = min(float(t[0]) for t in every), max(float(t[-1]) for t in every)
            scale = (hi - lo) or 1.0
            self._times = {
                "train": [(t - lo) / scale for t in train_t],
                "test": [(t - lo) / scale for t in (test_t or [])],
            }
        return train_x, train_y, test_x, test_y

    def observation_times(self, split: str, index: int) -> np.ndarray | None:
        times = self._times.get(split)
        return None if not times else times[index]


class PointsFileDataModule(SplitDataModule):
    """Points of a density, from a ``.npy`` file ``(points, dim)`` or an ``.npz`` holding ``points``.

    Rows holding a ``NaN`` or an infinity are dropped (the log line on load says how many); the rest is
    split at random into train/validation/test. ``model.dim`` must be the file's ``dim``; a 2-D
    density gets the picture of samples and learned density at the end of ``fit``.

    Args:
        path: the file.
        val_fraction / test_fraction: the random split.
        standardise: subtract the training split's mean and divide by its standard deviation.
        batch_size / seed: points per batch; the split's seed.
    """

    def __init__(
        self,
        path: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        standardise: bool = False,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        self.path = Path(path).expanduser()
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.standardise, self.seed = standardise, seed

    def _read(self) -> np.ndarray:
        if self.path.suffix == ".npz":
            return load_arrays(self.path, ("points",))["points"]
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path} does not exist; give your file with data.path=... (docs/data.md)"
            )
        return np.load(self.path, allow_pickle=False)

    def make_splits(self) -> dict[str, torch.Tensor]:
        points = np.asarray(self._read(), dtype=np.float64)
        if points.ndim == 1:
            points = points[:, None]
        if points.ndim != 2 or len(points) == 0:
            raise ValueError(f"{self.path}: expected points (n, dim), got an array of shape {points.shape}")
        finite = np.isfinite(points).all(axis=1)
        kept = points[finite]
        if len(kept) < 3:
            raise ValueError(
                f"{self.path}: {len(kept)} rows without NaN/inf remain of {len(points)}; need at least 3"
            )
        train, val, test = split_indices(len(kept), self.val_fraction, self.test_fraction, self.seed)
        if self.standardise:
            mean, std = kept[train].mean(0), kept[train].std(0)
            kept = (kept - mean) / np.where(std > 1e-12, std, 1.0)
        log.info(
            "%s read %d points of dimension %d from %s; dropped %d row(s) holding NaN or inf; split %d "
            "train, "
            "%d validation, %d test%s; set model.dim=%d",
            type(self).__name__,
            len(points),
            points.shape[1],
            self.path,
            int((~finite).sum()),
            len(train),
            len(val),
            len(test),
            " (standardised with the training split's mean and std)" if self.standardise else "",
            points.shape[1],
        )
        x = torch.from_numpy(kept.astype(np.float32))
        return {"train": x[train], "val": x[val], "test": x[test]}

    @property
    def num_features(self) -> int:
        return int(self.get_split("train").tensors[0].shape[1])

    def split(self, name: str) -> torch.Tensor:
        """The points of split ``name``, ``(n, dim)``."""
        return self.get_split(name).tensors[0]


class IrregularFileDataModule(SplitDataModule):
    """Irregularly sampled series from an ``.npz`` file, for the latent ODE (``model=latent_ode``).

    The file holds ``times`` ``(series, length)``, each row a series' own observation times (strictly
    increasing, ``>= 0``; ``NaN`` pads a shorter series), and ``values`` ``(series, length, channels)``
    with ``NaN`` where a channel was not observed at that time. Nothing is filled: the masks carry
    what was observed (:mod:`nde_zoo.datamodules.irregular`), and the loss counts only those values.

    Args:
        path: the file.
        observed_fraction: the encoder reads the observations at ``t <= observed_fraction * t_end``
            (``t_end``: the latest time in the file); the rest are extrapolation targets.
        val_fraction / test_fraction / seed: the random split of the series.
        standardise: scale each channel by the training split's observed mean and std.
        batch_size: series per batch.

    ``model.data_dim`` is ``channels``.
    """

    def __init__(
        self,
        path: str,
        observed_fraction: float = 0.5,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        standardise: bool = False,
        batch_size: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        if not 0 < observed_fraction <= 1:
            raise ValueError(f"observed_fraction must be in (0, 1], got {observed_fraction}")
        self.path = Path(path).expanduser()
        self.observed_fraction = observed_fraction
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.standardise, self.seed = standardise, seed
        self._t_end: float | None = None
        self._channels: int | None = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        arrays = load_arrays(self.path, ("times", "values"))
        times, values = arrays["times"].astype(np.float64), arrays["values"].astype(np.float64)
        if values.ndim == 2:
            values = values[:, :, None]
        if times.ndim != 2 or values.ndim != 3 or values.shape[:2] != times.shape:
            raise ValueError(
                f"{self.path}: times must be (series, length) and values (series, length, channels); "
                f"got {times.shape} and {values.shape}"
            )
        return times, values

    @property
    def t_end(self) -> float:
        if self._t_end is None:
            times, _ = self._arrays()
            self._t_end = float(np.nanmax(times))
        return self._t_end

    @property
    def t_split(self) -> float:
        """The encoder reads observations at times ``<= t_split``."""
        return self.observed_fraction * self.t_end

    @property
    def num_features(self) -> int:
        if self._channels is None:
            self._channels = int(self._arrays()[1].shape[-1])
        return self._channels

    def make_splits(self) -> dict[str, IrregularDataset]:
        times, values = self._arrays()
        self._t_end, self._channels = float(np.nanmax(times)), int(values.shape[-1])
        train, val, test = split_indices(len(times), self.val_fraction, self.test_fraction, self.seed)
        if self.standardise:
            observed = values[train].reshape(-1, values.shape[-1])
            mean, std = np.nanmean(observed, axis=0), np.nanstd(observed, axis=0)
            values = (values - mean) / np.where(std > 1e-12, std, 1.0)
        records, counts = [], []
        for i in range(len(times)):
            valid = ~np.isnan(times[i])
            t, v = times[i][valid], values[i][valid]
            if len(t) == 0:
                raise ValueError(f"{self.path}: series {i} has no observation time")
            if t[0] < 0 or np.any(np.diff(t) <= 0):
                raise ValueError(
                    f"{self.path}: series {i}'s times must be >= 0 and increase strictly (the latent "
                    f"state z0 lives at t = 0: subtract each series' first time if need be); got "
                    f"{t[:8].tolist()} ..."
                )
            mask = ~np.isnan(v)
            counts.append(len(t))
            records.append(
                IrregularRecord(
                    torch.from_numpy(t.astype(np.float32)),
                    torch.from_numpy(np.nan_to_num(v).astype(np.float32)),
                    torch.from_numpy(mask),
                )
            )
        observed = sum(int(r.mask.sum()) for r in records)
        slots = sum(r.mask.numel() for r in records)
        log.info(
            "%s read %d series of %d channel(s) from %s: %d-%d observation times each on [0, %g]; %d of %d "
            "values observed (%d not observed: masked out, not filled); the encoder reads t <= %g; split %d "
            "train, %d validation, %d test; set model.data_dim=%d",
            type(self).__name__,
            len(records),
            self._channels,
            self.path,
            min(counts),
            max(counts),
            self._t_end,
            observed,
            slots,
            slots - observed,
            self.t_split,
            len(train),
            len(val),
            len(test),
            self._channels,
        )
        return {
            name: IrregularDataset([records[i] for i in idx], self.t_split)
            for name, idx in (("train", train), ("val", val), ("test", test))
        }
