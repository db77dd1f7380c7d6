"""Irregularly sampled noisy 2-D spirals, clockwise and counter-clockwise (Chen et al. 2018, sec. 5.1).

The two curves of the latent ODE demonstration of Chen et al. ("Neural Ordinary
Differential Equations"), with their constants ``a = 0``, ``b = 0.3`` on the parameter
range ``u in [0, 6 pi]``:

    counter-clockwise:  w = u,            r = a + b w,        x = (r cos w + 5, r sin w)
    clockwise:          w = 6 pi + 1 - u,  r = a + 50 b / w,   x = (r cos w - 5, r sin w)

Each series is a window ``u = u0 + t``, ``t in [0, duration]`` (``u0`` uniform such that the
window fits), seen at ``n_obs`` times drawn without replacement from a regular grid of
``n_grid`` times: different times for every series, as in Rubanova et al.'s irregular
setting. Gaussian noise (``noise_std``) is added to the observations. The encoder reads the
observations at ``t <= observed_fraction * duration``; the rest are extrapolation targets.
Nothing is downloaded: every split is generated from its own seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from nde_zoo.datamodules.base import SplitDataModule
from nde_zoo.datamodules.irregular import IrregularDataset, IrregularRecord

__all__ = ["SpiralsDataModule", "spiral_points"]

A, B, U_MAX = 0.0, 0.3, 6 * math.pi


def spiral_points(u: np.ndarray, clockwise: bool) -> np.ndarray:
    """The clean spiral at parameters ``u`` ``(n,)`` -> points ``(n, 2)``."""
    if clockwise:
        w = U_MAX + 1.0 - u
        r = A + 50.0 * B / w
        return np.stack([r * np.cos(w) - 5.0, r * np.sin(w)], axis=-1)
    r = A + B * u
    return np.stack([r * np.cos(u) + 5.0, r * np.sin(u)], axis=-1)


class SpiralsDataModule(SplitDataModule):
    """Noisy spirals seen at irregular times, batched on the union of their times (with masks).

    Args:
        n_train / n_val / n_test: series per split (each split from its own seed).
        n_grid: the regular grid of candidate times on ``[0, duration]``.
        n_obs: observation times per series, drawn from the grid without replacement.
        duration: length of a window in time (= spiral angle, radians).
        observed_fraction: the encoder reads ``t <= observed_fraction * duration``.
        noise_std: standard deviation of the observation noise.
        batch_size: series per batch.
        seed: base seed.
    """

    def __init__(
        self,
        n_train: int = 1000,
        n_val: int = 100,
        n_test: int = 100,
        n_grid: int = 100,
        n_obs: int = 40,
        duration: float = 4.0,
        observed_fraction: float = 0.5,
        noise_std: float = 0.1,
        batch_size: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        if not 1 <= n_obs <= n_grid:
            raise ValueError(f"n_obs={n_obs} must be between 1 and n_grid={n_grid}")
        if not 0 < duration < U_MAX:
            raise ValueError(f"duration={duration} must be in (0, 6 pi)")
        if not 0 < observed_fraction <= 1:
            raise ValueError(f"observed_fraction={observed_fraction} must be in (0, 1]")
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.n_grid, self.n_obs, self.duration = n_grid, n_obs, duration
        self.observed_fraction, self.noise_std = observed_fraction, noise_std
        self.seed = seed
        self._params: dict[str, list[tuple[float, bool]]] = {}  # (u0, clockwise) per series

    @property
    def num_features(self) -> int:
        return 2

    @property
    def t_split(self) -> float:
        """The encoder reads observations at times ``<= t_split``."""
        return self.observed_fraction * self.duration

    @property
    def t_end(self) -> float:
        return self.duration

    def _generate(self, n: int, seed: int) -> tuple[list[IrregularRecord], list[tuple[float, bool]]]:
        rng = np.random.default_rng(seed)
        grid = np.linspace(0.0, self.duration, self.n_grid)
        records, params = [], []
        for _ in range(n):
            clockwise = bool(rng.integers(0, 2))
            u0 = float(rng.uniform(0.0, U_MAX - self.duration))
            idx = np.sort(rng.choice(self.n_grid, self.n_obs, replace=False))
            t = grid[idx]
            x = spiral_points(u0 + t, clockwise) + self.noise_std * rng.standard_normal((self.n_obs, 2))
            records.append(
                IrregularRecord(
                    torch.tensor(t, dtype=torch.float32),
                    torch.tensor(x, dtype=torch.float32),
                    torch.ones(self.n_obs, 2, dtype=torch.bool),
                )
            )
            params.append((u0, clockwise))
        return records, params

    def make_splits(self) -> dict[str, IrregularDataset]:
        splits = {}
        for i, (split, n) in enumerate(self.sizes.items()):
            records, params = self._generate(n, self.seed + i)
            splits[split] = IrregularDataset(records, self.t_split)
            self._params[split] = params
        return splits

    def truth(self, split: str, index: int, times: Tensor) -> Tensor:
        """The noise-free trajectory of series ``index`` of ``split`` at ``times`` -> ``(len(times), 2)``."""
        self.setup()
        u0, clockwise = self._params[split][index]
        return torch.from_numpy(spiral_points(u0 + times.double().cpu().numpy(), clockwise)).float()
