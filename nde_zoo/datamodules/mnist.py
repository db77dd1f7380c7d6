"""MNIST from its IDX files: a real loader, tested on tiny IDX fixtures (no download in tests).

torchvision is not a dependency (its wheels pin torch versions tightly), so the four IDX
files are parsed here; ``download=True`` fetches them once when online.
"""

from __future__ import annotations

import gzip
import struct
import urllib.request
from pathlib import Path

import numpy as np

from nde_zoo.datamodules.tabular import ArrayDataModule, split_indices

__all__ = ["MNISTDataModule", "read_idx"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped); errors name the file and what is wrong with it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; expected "
            f"00 00 <type> <ndim>); re-download it or delete it so download=true fetches it"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


class MNISTDataModule(ArrayDataModule):
    """MNIST, flattened to 784 features in [0, 1] (then standardised), 10 classes.

    Args:
        root: a folder holding the four IDX files (plain or ``.gz``; torchvision's
            ``root/MNIST/raw`` layout is found too).
        download: fetch missing files from the public mirrors.
        val_fraction: the part of the 60k training images held out for validation; the
            official 10k test images are the test split.
    """

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 1 / 12,
        seed: int = 0,
        standardise: bool = False,
    ) -> None:
        super().__init__(batch_size, val_fraction, 0.0, seed, standardise)
        self.root = Path(root)
        self.download = download
        self._n_train = 0

    def _find(self, stem: str) -> Path | None:
        for folder in (self.root, self.root / "MNIST" / "raw"):
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    return folder / name
        return None

    def _fetch(self, stem: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / (stem + ".gz")
        errors = []
        for mirror in MIRRORS:
            try:
                urllib.request.urlretrieve(mirror + stem + ".gz", target)
                return target
            except OSError as exc:
                errors.append(f"{mirror}: {exc}")
        raise RuntimeError(f"could not download {stem}: " + "; ".join(errors))

    def prepare_data(self) -> None:
        for stem in FILES.values():
            if self._find(stem) is None:
                if not self.download:
                    raise FileNotFoundError(
                        f"MNIST file {stem}[.gz] not found under {self.root}; pass data.download=true "
                        f"(needs a network) or put the four IDX files there, or use data=digits "
                        f"(embedded, no download)"
                    )
                self._fetch(stem)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self.prepare_data()
        arrays = {key: read_idx(self._find(stem)) for key, stem in FILES.items()}  # type: ignore[arg-type]
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if len(images) != len(labels):
                raise ValueError(
                    f"MNIST {split} split under {self.root}: {len(images)} images but {len(labels)} labels"
                )
        self._n_train = len(arrays["train_images"])
        x = np.concatenate([arrays["train_images"], arrays["test_images"]]).reshape(-1, 28 * 28 if
            arrays["train_images"].shape[1:] == (28, 28) else int(np.prod(arrays["train_images"].shape[1:])))
        y = np.concatenate([arrays["train_labels"], arrays["test_labels"]])
        return x.astype(np.float32) / 255.0, y

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        train, val, _ = split_indices(self._n_train, self.val_fraction, 0.0, self.seed)
        return train, val, np.arange(self._n_train, n)
