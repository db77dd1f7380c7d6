"""Synthetic spirals for the Neural CDE: is a 2-D spiral traced clockwise or anticlockwise?

The torchcde example task (``example/time_series_classification.py``), generated here:
each series samples a spiral ``r(s) = r0 (1 - s / (2 s_max))`` at angle ``theta0 +/- s``
for ``s`` in ``[0, s_max]``, plus Gaussian noise; the label is the direction. Options make
it harder in the ways a CDE is built for: ``irregular`` samples the times at random (they
enter through the time channel), ``min_length < length`` makes the series variable-length
(padded by filling forward), ``missing_rate`` drops observations.
"""

from __future__ import annotations

import math

import numpy as np

from nde_zoo.datamodules.timeseries import SeriesDataModule

__all__ = ["CDESpiralsDataModule", "make_spirals"]


def make_spirals(
    n: int, length: int, min_length: int, noise: float, irregular: bool, seed: int
) -> tuple[list[np.ndarray], list[str], list[np.ndarray]]:
    """``n`` spirals: series ``(length_i, 2)``, labels ``"clockwise"``/``"anticlockwise"``, and their
    observation times in ``[0, 1]``."""
    rng = np.random.default_rng(seed)
    s_max = 4 * math.pi
    series, labels, times = [], [], []
    for _ in range(n):
        m = int(rng.integers(min_length, length + 1))
        u = np.sort(rng.uniform(0.0, 1.0, m)) if irregular else np.linspace(0.0, 1.0, length)[:m]
        if irregular:
            u[0] = 0.0
        s = u * s_max
        direction = 1.0 if rng.random() < 0.5 else -1.0
        theta = rng.uniform(0, 2 * math.pi) + direction * s
        radius = rng.uniform(0.8, 1.2) * (1.0 - s / (2 * s_max))
        xy = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1) + noise * rng.normal(
            size=(m, 2)
        )
        series.append(xy)
        labels.append("anticlockwise" if direction > 0 else "clockwise")
        times.append(u)
    return series, labels, times


class CDESpiralsDataModule(SeriesDataModule):
    """Clockwise vs anticlockwise spirals as Neural CDE path knots (2 classes, 2 value channels).

    Args:
        n_series: series in total (split into train/val/test by the fractions).
        length / min_length: the longest series and the shortest (equal: all the same length).
        noise: std of the Gaussian noise on the points.
        irregular: sample each series at sorted random times (``False``: a uniform grid).
        batch_size / val_fraction / test_fraction / missing_rate / intensity / seed: see
            :class:`~nde_zoo.datamodules.timeseries.SeriesDataModule`.
    """

    def __init__(
        self,
        n_series: int = 512,
        length: int = 64,
        min_length: int = 64,
        noise: float = 0.05,
        irregular: bool = False,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        missing_rate: float = 0.0,
        intensity: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, missing_rate, intensity, seed)
        if not 2 <= min_length <= length:
            raise ValueError(f"need 2 <= min_length <= length, got min_length={min_length}, length={length}")
        self.n_series, self.length, self.min_length = n_series, length, min_length
        self.noise, self.irregular = noise, irregular
        self._times: list[np.ndarray] = []

    def load(self):
        series, labels, self._times = make_spirals(
            self.n_series, self.length, self.min_length, self.noise, self.irregular, self.seed
        )
        return series, labels, None, None

    def observation_times(self, split: str, index: int) -> np.ndarray | None:
        return self._times[index]  # load() returns no test split: every series is "train"
