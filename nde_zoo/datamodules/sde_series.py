"""Synthetic stochastic series for the latent SDE: a noisy damped oscillator, observed with noise.

Each series is the position of ``x'' = -omega^2 x - gamma x' + sigma xi(t)`` (white noise
``xi``) from a random initial position and velocity, simulated with Euler-Maruyama on a
fine grid and observed at ``n_times`` equally spaced times on ``[0, t1]`` with Gaussian
noise of std ``obs_noise``. Nothing is downloaded; each split has its own seed.

Batches are ``(t, x)``: ``t`` ``(batch, n_times)`` (the same times in every row) and ``x``
``(batch, n_times, 1)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import TensorDataset

from nde_zoo.datamodules.base import SplitDataModule

__all__ = ["SDESeriesDataModule", "simulate_oscillator"]


def simulate_oscillator(
    n: int,
    n_times: int,
    t1: float,
    omega: float,
    gamma: float,
    sigma: float,
    obs_noise: float,
    seed: int,
    substeps: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` observed paths: times ``(n_times,)`` and positions ``(n, n_times)``."""
    rng = np.random.default_rng(seed)
    times = np.linspace(0.0, t1, n_times)
    h = (times[1] - times[0]) / substeps
    x = rng.normal(0.0, 1.0, n)
    v = rng.normal(0.0, omega * 0.5, n)
    out = np.empty((n, n_times))
    out[:, 0] = x
    for k in range(1, n_times):
        for _ in range(substeps):
            dw = rng.normal(0.0, math.sqrt(h), n)
            x, v = x + v * h, v + (-(omega**2) * x - gamma * v) * h + sigma * dw
        out[:, k] = x
    return times, out + obs_noise * rng.normal(size=out.shape)


class SDESeriesDataModule(SplitDataModule):
    """Noisy damped-oscillator positions for the latent SDE.

    Args:
        n_train / n_val / n_test: series per split (each split drawn with its own seed).
        n_times: observations per series, equally spaced on ``[0, t1]`` (``n_times - 1`` a power
            of two keeps the spacing a binary fraction, which reversible Heun's grid needs).
        t1: the observation window.
        omega / gamma / sigma: angular frequency, damping and noise strength of the oscillator.
        obs_noise: std of the observation noise.
        batch_size: series per batch.
        seed: base seed.
    """

    def __init__(
        self,
        n_train: int = 512,
        n_val: int = 64,
        n_test: int = 128,
        n_times: int = 33,
        t1: float = 2.0,
        omega: float = 4.0,
        gamma: float = 0.3,
        sigma: float = 0.5,
        obs_noise: float = 0.05,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        if n_times < 2:
            raise ValueError(f"n_times must be at least 2, got {n_times}")
        self.n = {"train": n_train, "val": n_val, "test": n_test}
        self.n_times, self.t1 = n_times, t1
        self.omega, self.gamma, self.sigma, self.obs_noise = omega, gamma, sigma, obs_noise
        self.seed = seed

    def make_splits(self) -> dict[str, TensorDataset]:
        splits = {}
        for offset, (split, n) in enumerate(self.n.items()):
            times, x = simulate_oscillator(
                n,
                self.n_times,
                self.t1,
                self.omega,
                self.gamma,
                self.sigma,
                self.obs_noise,
                seed=self.seed * 1000 + offset,
            )
            t = torch.from_numpy(times.astype(np.float32)).expand(n, -1).contiguous()
            splits[split] = TensorDataset(t, torch.from_numpy(x.astype(np.float32)).unsqueeze(-1))
        return splits

    @property
    def obs_dim(self) -> int:
        return 1
