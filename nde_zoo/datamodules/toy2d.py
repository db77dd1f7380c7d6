"""Generated 2-D densities for flows: two moons (default), 8 gaussians, pinwheel, checkerboard, circles.

Nothing is downloaded: each split is drawn from its generator with its own seed, so the
train, validation and test sets are fixed and independent.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import make_circles, make_moons

from nde_zoo.datamodules.base import SplitDataModule

__all__ = ["Toy2DDataModule", "sample_toy2d", "TOY2D"]


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    centres = np.array([(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4]) * 2.0
    return centres[rng.integers(0, 8, n)] + 0.1 * rng.standard_normal((n, 2))


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    arms, radial, tangential, rate = 5, 0.3, 0.1, 0.25
    angles = np.linspace(0, 2 * math.pi, arms, endpoint=False)
    feats = rng.standard_normal((n, 2)) * np.array([radial, tangential])
    feats[:, 0] += 1.0
    labels = rng.integers(0, arms, n)
    rot = angles[labels] + rate * np.exp(feats[:, 0])
    rotations = np.stack([np.cos(rot), -np.sin(rot), np.sin(rot), np.cos(rot)], axis=1).reshape(n, 2, 2)
    return 2.0 * np.einsum("ti,tij->tj", feats, rotations)


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1)


def _two_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    x, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    return x - np.array([0.5, 0.25])  # centred


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    x, _ = make_circles(n, noise=0.04, factor=0.5, random_state=int(rng.integers(2**31)))
    return 2.0 * x


TOY2D = {
    "two_moons": _two_moons,
    "eight_gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "checkerboard": _checkerboard,
    "circles": _circles,
}


def sample_toy2d(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` points ``(n, 2)`` of the named density."""
    if name not in TOY2D:
        raise ValueError(f"unknown 2-D dataset {name!r}; choose one of {', '.join(sorted(TOY2D))}")
    return torch.from_numpy(TOY2D[name](n, np.random.default_rng(seed)).astype(np.float32))


class Toy2DDataModule(SplitDataModule):
    """A generated 2-D density split into fixed train/val/test sets.

    Args:
        dataset: two_moons (default), eight_gaussians, pinwheel, checkerboard or circles.
        n_train / n_val / n_test: points per split (each drawn with its own seed).
        batch_size: points per training batch.
        seed: base seed of the generators.
    """

    def __init__(self, dataset: str = "two_moons", n_train: int = 8000, n_val: int = 1000, n_test: int = 2000,
                 batch_size: int = 512, seed: int = 0) -> None:
        super().__init__(batch_size)
        if dataset not in TOY2D:
            raise ValueError(f"unknown 2-D dataset {dataset!r}; choose one of {', '.join(sorted(TOY2D))}")
        self.dataset, self.seed = dataset, seed
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    @property
    def num_features(self) -> int:
        return 2

    def make_splits(self) -> dict[str, torch.Tensor]:
        return {split: sample_toy2d(self.dataset, n, self.seed + i)
                for i, (split, n) in enumerate(self.sizes.items())}

    def split(self, name: str) -> torch.Tensor:
        """The points of split ``name``, ``(n, 2)``."""
        return self.get_split(name).tensors[0]
