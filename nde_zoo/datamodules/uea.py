"""UEA multivariate time-series classification sets for the Neural CDE.

- ``JapaneseVowels`` (the default; 9 speakers, 12 LPC channels, lengths 7 to 29, 270 train
  and 370 test series) ships inside ``aeon`` and is read with aeon's own loader: no download.
- Any other UEA set, e.g. ``CharacterTrajectories`` (20 letters, 3 channels, lengths 60 to
  182), is read from ``<root>/<name>/<name>_{TRAIN,TEST}.ts`` with :func:`read_ts`, which
  names the file and line of anything malformed; ``download=True`` fetches the archive once
  from timeseriesclassification.com when it is missing.

Preprocessing (time channel, dropped observations, intensity, fill-forward padding of
variable-length series) is :class:`~nde_zoo.datamodules.timeseries.SeriesDataModule`'s.
"""

from __future__ import annotations

import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from nde_zoo.datamodules.timeseries import SeriesDataModule

__all__ = ["UEADataModule", "read_ts", "aeon_ships"]

ARCHIVE_URL = "https://timeseriesclassification.com/aeon-toolkit/{name}.zip"


def _fail(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}:{line}: {message}")


def read_ts(path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """Read a ``.ts`` classification file (the UEA/sktime format) without timestamps.

    Returns the series, each ``(length, channels)`` with NaN for ``?``, and their labels.
    Raises ``ValueError("<file>:<line>: ...")`` on anything malformed.
    """
    path = Path(path)
    series: list[np.ndarray] = []
    labels: list[str] = []
    dimensions: int | None = None
    class_labels: set[str] | None = None
    in_data = False
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise _fail(
                        path,
                        number,
                        f"expected a header line starting with '@' before @data, got {line[:40]!r}",
                    )
                key, _, value = line[1:].partition(" ")
                key, value = key.lower(), value.strip()
                if key == "timestamps" and value.lower() == "true":
                    raise _fail(path, number, "series with timestamps are not supported (@timeStamps true)")
                if key == "dimensions":
                    if not value.isdigit() or int(value) < 1:
                        raise _fail(path, number, f"@dimensions must be a positive integer, got {value!r}")
                    dimensions = int(value)
                if key == "classlabel":
                    flag, *names = value.split()
                    if flag.lower() != "true":
                        raise _fail(path, number, "not a classification file (@classLabel false)")
                    class_labels = set(names)
                if key == "data":
                    in_data = True
                continue
            *fields, label = line.split(":")
            if not fields:
                raise _fail(
                    path, number, "a data line needs channel values and a class label separated by ':'"
                )
            if dimensions is not None and len(fields) != dimensions:
                raise _fail(
                    path, number, f"expected {dimensions} channels (@dimensions), found {len(fields)}"
                )
            label = label.strip()
            if class_labels is not None and label not in class_labels:
                raise _fail(
                    path, number, f"class label {label!r} is not one of @classLabel {sorted(class_labels)}"
                )
            try:
                channels = [[np.nan if v.strip() == "?" else float(v) for v in f.split(",")] for f in fields]
            except ValueError as exc:
                raise _fail(path, number, f"a value is not a number ({exc})") from None
            if len({len(c) for c in channels}) != 1:
                raise _fail(
                    path, number, f"channels of one series differ in length: {[len(c) for c in channels]}"
                )
            series.append(np.asarray(channels, dtype=np.float64).T)  # (length, channels)
            labels.append(label)
    if not in_data:
        raise ValueError(f"{path}: no @data section")
    if not series:
        raise ValueError(f"{path}: no series after @data")
    return series, labels


def aeon_ships(name: str) -> bool:
    """Whether the installed ``aeon`` ships the UEA set ``name`` (no download needed)."""
    try:
        import aeon
    except ImportError:
        return False
    return (Path(aeon.__file__).parent / "datasets" / "data" / name / f"{name}_TRAIN.ts").is_file()


class UEADataModule(SeriesDataModule):
    """A UEA multivariate classification set as Neural CDE path knots.

    Args:
        name: the UEA set, ``JapaneseVowels`` (embedded via aeon) or e.g. ``CharacterTrajectories``.
        root: where sets not shipped with aeon live: ``<root>/<name>/<name>_TRAIN.ts`` and ``_TEST.ts``.
        download: fetch a missing set from timeseriesclassification.com (needs a network).
        batch_size / val_fraction / missing_rate / intensity / seed: see
            :class:`~nde_zoo.datamodules.timeseries.SeriesDataModule`; the official test
            split is the test set, ``val_fraction`` of the training split is held out.
    """

    def __init__(
        self,
        name: str = "JapaneseVowels",
        root: str = "data/uea",
        download: bool = False,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        missing_rate: float = 0.0,
        intensity: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, 0.0, missing_rate, intensity, seed)
        self.name = name
        self.root = Path(root)
        self.download = download

    def source(self) -> str:
        if aeon_ships(self.name):
            return f"aeon's embedded copy of {self.name}"
        files = self._files()
        return f"{files['train']} and {files['test']}"

    def _files(self) -> dict[str, Path]:
        folder = self.root / self.name
        return {split: folder / f"{self.name}_{split.upper()}.ts" for split in ("train", "test")}

    def prepare_data(self) -> None:
        if aeon_ships(self.name) or all(p.is_file() for p in self._files().values()):
            return
        if not self.download:
            raise FileNotFoundError(
                f"UEA set {self.name!r} is not shipped with aeon and {self._files()['train']} is missing; "
                f"pass data.download=true (needs a network), or put {self.name}_TRAIN.ts and "
                f"{self.name}_TEST.ts under {self.root / self.name}, or use data=japanese_vowels (embedded, "
                "no download)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        archive = self.root / f"{self.name}.zip"
        urllib.request.urlretrieve(ARCHIVE_URL.format(name=self.name), archive)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(self.root / self.name)
        for target in self._files().values():  # archives may nest the files in a folder
            if not target.is_file():
                found = sorted((self.root / self.name).rglob(target.name))
                if not found:
                    raise FileNotFoundError(f"{archive} has no {target.name}")
                found[0].replace(target)

    def load(self):
        if aeon_ships(self.name):
            from aeon.datasets import load_classification

            out = []
            for split in ("train", "test"):
                x, y = load_classification(self.name, split=split)
                out += [[np.asarray(s, dtype=np.float64).T for s in x], [str(v) for v in y]]
            return tuple(out)
        self.prepare_data()
        files = self._files()
        train_x, train_y = read_ts(files["train"])
        test_x, test_y = read_ts(files["test"])
        return train_x, train_y, test_x, test_y
