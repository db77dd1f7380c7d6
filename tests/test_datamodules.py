"""Datamodules: the embedded digits set and the MNIST IDX loader on tiny fixtures."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from nde_zoo.datamodules import DigitsDataModule, MNISTDataModule
from nde_zoo.datamodules.mnist import FILES, read_idx


def test_digits_split_is_fixed_and_standardised():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    a.setup(), b.setup()
    xa, ya = a._splits["test"].tensors
    xb, yb = b._splits["test"].tensors
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    sizes = {k: len(v) for k, v in a._splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == round(0.15 * 1797)
    x_train = a._splits["train"].tensors[0]
    assert x_train.mean().abs() < 1e-5 and a.num_features == 64
    batch = next(iter(a.train_dataloader()))
    assert batch[0].shape == (64, 64) and batch[0].dtype == torch.float32 and batch[1].dtype == torch.int64


def test_bad_split_fractions():
    with pytest.raises(ValueError, match="must be in"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5).setup()


def _write_idx(path, array, dtype_code=0x08, gz=False):
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(data)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / (FILES["train_images"] + ".gz"), rng.integers(0, 256, (24, 28, 28)), gz=True)
    _write_idx(raw / (FILES["train_labels"] + ".gz"), rng.integers(0, 10, (24,)), gz=True)
    _write_idx(raw / FILES["test_images"], rng.integers(0, 256, (6, 28, 28)))
    _write_idx(raw / FILES["test_labels"], rng.integers(0, 10, (6,)))
    return tmp_path


def test_mnist_loads_a_tiny_fixture_in_torchvision_layout(mnist_dir):
    dm = MNISTDataModule(root=str(mnist_dir), batch_size=4, val_fraction=0.25)
    dm.setup()
    assert dm.num_features == 784
    assert [len(dm._splits[k]) for k in ("train", "val", "test")] == [18, 6, 6]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 784) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_mnist_missing_files_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[.gz\] not found .*download=true.*data=digits"):
        MNISTDataModule(root=str(tmp_path)).setup()


def test_malformed_idx_names_the_file(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match=r"bad-idx: not an IDX file \(bad magic number 12345678"):
        read_idx(bad)
    truncated = tmp_path / "short-idx"
    _write_idx(truncated, np.zeros((3, 2, 2)))
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"short-idx: header declares shape \(3, 2, 2\) \(12 bytes of data\) but the file holds 9"):
        read_idx(truncated)
