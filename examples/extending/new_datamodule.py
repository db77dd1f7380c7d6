"""A new datamodule needs only its data: ``make_splits()`` (docs/extending.md, "A new datamodule").

Noisy sine waves to regress their amplitude from: batches ``(x, y)`` with ``x`` ``(batch, 16)``
(the wave sampled at 16 times) and ``y`` ``(batch, 1)``. Run: ``python examples/extending/new_datamodule.py``.
"""

from __future__ import annotations

import torch

from nde_zoo.datamodules.base import SplitDataModule


class SineDataModule(SplitDataModule):
    """Sine waves ``a sin(2 pi t + phase) + noise``; the target is the amplitude ``a``.

    Args:
        n_train / n_val / n_test: waves per split; batch_size: waves per batch; seed: the draw.
    """

    def __init__(self, n_train: int = 512, n_val: int = 64, n_test: int = 128, batch_size: int = 64,
                 seed: int = 0) -> None:
        super().__init__(batch_size)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.seed = seed

    @property
    def num_features(self) -> int:  # models check it against their own input size
        return 16

    def make_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        t = torch.linspace(0, 1, 16)
        splits = {}
        for i, (name, n) in enumerate(self.sizes.items()):
            g = torch.Generator().manual_seed(self.seed + i)
            amplitude = 0.5 + torch.rand(n, 1, generator=g)
            phase = 2 * torch.pi * torch.rand(n, 1, generator=g)
            x = amplitude * torch.sin(2 * torch.pi * t + phase) + 0.05 * torch.randn(n, 16, generator=g)
            splits[name] = (x, amplitude)  # a tuple of tensors becomes a TensorDataset
        return splits


def main() -> dict[str, int]:
    data = SineDataModule(n_train=64, n_val=16, n_test=16, batch_size=16)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 16) and y.shape == (16, 1)
    sizes = {name: len(data.get_split(name)) for name in ("train", "val", "test")}
    print("SineDataModule splits:", sizes)
    return sizes


if __name__ == "__main__":
    main()
