"""Tabular densities for flows: scikit-learn's wine and breast cancer (embedded), and the MAF
paper's POWER, GAS and MINIBOONE (Papamakarios et al. 2017; FFJORD's tabular benchmarks).

Embedded (no download): ``wine`` (178 x 13) and ``breast_cancer`` (569 x 30), split at random
(``seed``) and standardised with the training split's mean and standard deviation.

The MAF sets are read from the files of the MAF paper's data archive (``root`` = its ``data``
folder, holding ``power/``, ``gas/``, ``miniboone/``) and preprocessed as that paper's code
does, which FFJORD reused:

- **POWER** ``power/data.npy`` ``(N, 8)``: shuffled (seed 42), columns 1 and 3 dropped, uniform
  dequantisation noise added (0.001 to the gap, 0.01 to the voltage, 1 to the three
  sub-meterings, none to the time), last 10 % test, last 10 % of the rest validation,
  standardised with train+validation statistics -> 6 dimensions.
- **GAS** ``gas/ethylene_CO.pickle`` (a pandas DataFrame; needs pandas) or the same table as
  ``gas/ethylene_CO.csv`` (header row, comma-separated, e.g. ``frame.to_csv(path, index=False)``):
  columns ``Time``, ``Meth``, ``Eth``
  dropped, then while some column correlates above 0.98 with another, the first such column
  is dropped; standardised; last 10 % test, last 10 % of the rest validation -> 8 dimensions.
- **MINIBOONE** ``miniboone/data.npy`` (already cleaned, ``(N, 43)``) or the UCI text file
  ``miniboone/MiniBooNE_PID.txt`` (a first line with the two class counts, then rows of 50
  numbers; rows holding the -999 missing-value marker are dropped); last 10 % test, last 10 %
  of the rest validation, standardised with train+validation statistics.

Text files are checked line by line: a malformed one raises an error naming file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from nde_zoo.datamodules.base import SplitDataModule
from nde_zoo.datamodules.tabular import split_indices

__all__ = [
    "DensityTabularDataModule",
    "load_power",
    "load_gas",
    "load_miniboone",
    "read_numeric_table",
    "DATASETS",
]

EMBEDDED = ("wine", "breast_cancer")
MAF = ("power", "gas", "miniboone")
DATASETS = EMBEDDED + MAF
_SPLIT_WS = re.compile(r"[\s,]+")


def read_numeric_table(
    path: str | Path,
    *,
    header: bool,
    delimiter: str | None = ",",
    skip_lines: int = 0,
    width: int | None = None,
) -> tuple[list[str], np.ndarray]:
    """Read a table of numbers, checking each line.

    Args:
        path: the file.
        header: the first (non-skipped) line names the columns.
        delimiter: field separator; ``None`` splits on any run of whitespace or commas.
        skip_lines: lines to skip before the header/data.
        width: the expected number of fields per row (default: the header's or the first row's).

    Returns:
        ``(column names, array (rows, columns))``; names are ``""`` without a header.

    Raises:
        ValueError: ``"<file>:<line>: ..."`` for a row of the wrong length, a field that is not a
            number, or a file without data.
    """
    path = Path(path)
    names: list[str] = []
    rows: list[list[float]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno <= skip_lines:
                continue
            line = raw.strip()
            if not line:
                continue
            fields = [f.strip() for f in (line.split(delimiter) if delimiter else _SPLIT_WS.split(line))]
            if header and not names:
                names = fields
                width = width or len(names)
                continue
            width = width or len(fields)
            if len(fields) != width:
                raise ValueError(
                    f"{path}:{lineno}: expected {width} fields, got {len(fields)}: {line[:80]!r}"
                )
            try:
                rows.append([float(f) for f in fields])
            except ValueError:
                bad = next(f for f in fields if not _is_float(f))
                raise ValueError(f"{path}:{lineno}: field {bad!r} is not a number") from None
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return names or [""] * (width or 0), np.asarray(rows, dtype=np.float64)


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _load_npy(path: Path, columns: int | None) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    if (
        data.ndim != 2
        or (columns is not None and data.shape[1] != columns)
        or not np.issubdtype(data.dtype, np.number)
    ):
        want = f"(N, {columns})" if columns else "(N, D)"
        raise ValueError(f"{path}: expected a numeric {want} array, got shape {data.shape} of {data.dtype}")
    if not np.isfinite(data).all():
        row = int(np.argwhere(~np.isfinite(data))[0, 0])
        raise ValueError(f"{path}: row {row} holds a non-finite value")
    return data.astype(np.float64)


def _tail_splits(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAF's split: the last 10 % test, the last 10 % of the rest validation."""
    n_test = int(0.1 * len(data))
    test, rest = data[len(data) - n_test :], data[: len(data) - n_test]
    n_val = int(0.1 * len(rest))
    return rest[: len(rest) - n_val], rest[len(rest) - n_val :], test


def _standardise(
    train: np.ndarray, val: np.ndarray, test: np.ndarray, stats: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu, sd = stats.mean(0), stats.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (train - mu) / sd, (val - mu) / sd, (test - mu) / sd


def load_power(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """POWER from MAF's ``power/data.npy``: ``(train, val, test)`` with 6 columns (module doc)."""
    data = _load_npy(Path(path), 8)
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = len(data)
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)
    noise = np.hstack([0.001 * rng.rand(n, 1), 0.01 * rng.rand(n, 1), rng.rand(n, 3), np.zeros((n, 1))])
    train, val, test = _tail_splits(data + noise)
    return _standardise(train, val, test, np.vstack([train, val]))


def _drop_correlated(
    names: list[str], data: np.ndarray, threshold: float = 0.98
) -> tuple[list[str], np.ndarray]:
    while data.shape[1] > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(data, rowvar=False)
        counts = (corr > threshold).sum(axis=1)  # the diagonal counts once
        over = np.flatnonzero(counts > 1)
        if len(over) == 0:
            break
        names, data = names[: over[0]] + names[over[0] + 1 :], np.delete(data, over[0], axis=1)
    return names, data


def load_gas(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GAS from MAF's ``ethylene_CO.pickle`` or the same table as CSV (module doc)."""
    path = Path(path)
    if path.suffix == ".pickle" or path.suffix == ".pkl":
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                f"{path}: reading the GAS pickle needs pandas (pip install pandas), or save the "
                f"table as gas/ethylene_CO.csv"
            ) from None
        frame = pd.read_pickle(path)
        names, data = [str(c) for c in frame.columns], frame.to_numpy(dtype=np.float64)
    else:
        names, data = read_numeric_table(path, header=True)
    keep = [i for i, n in enumerate(names) if n.strip().lower() not in ("time", "meth", "eth")]
    names, data = [names[i] for i in keep], data[:, keep]
    names, data = _drop_correlated(names, data)
    sd = data.std(0, ddof=1)
    data = (data - data.mean(0)) / np.where(sd > 1e-12, sd, 1.0)
    return _tail_splits(data)


def load_miniboone(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MINIBOONE from MAF's ``miniboone/data.npy`` or UCI's ``MiniBooNE_PID.txt`` (module doc)."""
    path = Path(path)
    if path.suffix == ".npy":
        data = _load_npy(path, None)
    else:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().split()
        if len(first) != 2 or not all(f.isdigit() for f in first):
            raise ValueError(
                f"{path}:1: expected the two class counts (signal, background), got {' '.join(first)!r}"
            )
        _, data = read_numeric_table(path, header=False, delimiter=None, skip_lines=1, width=50)
        if len(data) != int(first[0]) + int(first[1]):
            raise ValueError(
                f"{path}:1: the counts {first[0]} + {first[1]} do not match the {len(data)} data rows"
            )
        data = data[~(data == -999.0).any(axis=1)]
    train, val, test = _tail_splits(data)
    return _standardise(train, val, test, np.vstack([train, val]))


_MAF_FILES = {
    "power": (("power/data.npy",), load_power),
    "gas": (("gas/ethylene_CO.pickle", "gas/ethylene_CO.csv"), load_gas),
    "miniboone": (("miniboone/data.npy", "miniboone/MiniBooNE_PID.txt"), load_miniboone),
}


class DensityTabularDataModule(SplitDataModule):
    """A tabular density for the CNF: batches are ``(x,)`` with ``x`` ``(batch, features)``.

    Args:
        dataset: ``wine`` (13-d, default), ``breast_cancer`` (30-d), ``power`` (6-d), ``gas``
            (8-d) or ``miniboone`` (43-d).
        root: the MAF data folder (MAF sets only).
        max_rows: use at most this many rows of each split (``None``: all).
        batch_size: rows per batch.
        val_fraction / test_fraction / seed: the random split of the embedded sets (the MAF
            sets keep their paper's split).
    """

    def __init__(
        self,
        dataset: str = "wine",
        root: str = "data/maf",
        max_rows: int | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        if dataset not in DATASETS:
            raise ValueError(f"unknown tabular dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        self.dataset, self.root, self.max_rows = dataset, Path(root).expanduser(), max_rows
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed

    def file(self) -> Path:
        """The MAF file this dataset is read from."""
        candidates, _ = _MAF_FILES[self.dataset]
        for name in candidates:
            if (self.root / name).is_file():
                return self.root / name
        raise FileNotFoundError(
            f"{self.dataset.upper()} not found: looked for "
            f"{', '.join(str(self.root / c) for c in candidates)}; "
            f"set data.root to the MAF data folder (zenodo.org/record/1161203, data.tar.gz) or use "
            f"data.dataset=wine (embedded)"
        )

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.dataset in MAF:
            return _MAF_FILES[self.dataset][1](self.file())
        from sklearn.datasets import load_breast_cancer, load_wine

        x = (load_wine() if self.dataset == "wine" else load_breast_cancer()).data.astype(np.float64)
        train, val, test = split_indices(len(x), self.val_fraction, self.test_fraction, self.seed)
        return _standardise(x[train], x[val], x[test], x[train])

    def make_splits(self) -> dict[str, torch.Tensor]:
        arrays = self._arrays()
        return {
            name: torch.from_numpy(a[: self.max_rows].astype(np.float32))
            for name, a in zip(("train", "val", "test"), arrays, strict=True)
        }

    @property
    def num_features(self) -> int:
        return int(self.split("train").shape[1])

    def split(self, name: str) -> torch.Tensor:
        """The rows of split ``name``, ``(n, features)``."""
        return self.get_split(name).tensors[0]
