"""PhysioNet/CinC Challenge 2012 ICU records (set-a), the real data of Rubanova et al.'s latent ODE.

Each record is a text file ``<RecordID>.txt`` of the first 48 hours of an ICU stay::

    Time,Parameter,Value
    00:00,RecordID,132539
    00:00,Age,54
    00:00,Height,-1
    00:07,HR,73
    ...

``Time`` is ``HH:MM`` since admission. The variables are Rubanova et al.'s 41 (the four
general descriptors Age, Gender, Height, ICUType as channels at their time, plus the 37
time series, Weight among them); ``-1`` marks a missing descriptor. Times are rounded to
``quantization_hours`` (repeated measurements in one bin are averaged, as in the paper's
code) and scaled so that the 48 hours are ``[0, 1]``. Values are standardised per channel
with the training split's observed values. The encoder reads the first ``observe_hours``;
the rest are extrapolation targets (``observe_hours=48``: interpolation only).

``root`` is a folder of record files (``set-a/`` found inside it too) or the ``set-a.tar.gz``
archive itself; ``download=True`` fetches the archive when online. A malformed file raises
an error naming the file and line. Nothing is downloaded in tests: they use small fixtures.
"""

from __future__ import annotations

import math
import re
import tarfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from nde_zoo.datamodules.base import SplitDataModule
from nde_zoo.datamodules.irregular import IrregularDataset, IrregularRecord
from nde_zoo.datamodules.tabular import split_indices

__all__ = ["PhysioNetDataModule", "parse_record", "VARIABLES", "DESCRIPTORS"]

URL = "https://physionet.org/files/challenge-2012/1.0.0/set-a.tar.gz"
HORIZON_HOURS = 48.0
#: general descriptors; -1 marks a missing value
DESCRIPTORS = ("Age", "Gender", "Height", "ICUType", "Weight")
#: Rubanova et al.'s 41 channels, in their order
VARIABLES = (
    "Age",
    "Gender",
    "Height",
    "ICUType",
    "Weight",
    "Albumin",
    "ALP",
    "ALT",
    "AST",
    "Bilirubin",
    "BUN",
    "Cholesterol",
    "Creatinine",
    "DiasABP",
    "FiO2",
    "GCS",
    "Glucose",
    "HCO3",
    "HCT",
    "HR",
    "K",
    "Lactate",
    "Mg",
    "MAP",
    "MechVent",
    "Na",
    "NIDiasABP",
    "NIMAP",
    "NISysABP",
    "PaCO2",
    "PaO2",
    "pH",
    "Platelets",
    "RespRate",
    "SaO2",
    "SysABP",
    "Temp",
    "TroponinI",
    "TroponinT",
    "Urine",
    "WBC",
)
_TIME = re.compile(r"^(\d{1,3}):([0-5]\d)$")


def parse_record(
    lines: Iterable[str], source: str, variables: Sequence[str] = VARIABLES, quantization_hours: float = 0.1
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Parse one record file.

    Args:
        lines: the file's lines.
        source: the file's name, for error messages.
        variables: the channels to keep (others of :data:`VARIABLES` are skipped).
        quantization_hours: times are rounded to multiples of this (0: no rounding).

    Returns:
        ``(record_id, times_hours (n,), values (n, channels), mask (n, channels))`` with
        ``times`` strictly increasing; repeated measurements in one time bin are averaged.

    Raises:
        ValueError: naming ``source`` and the line, for a bad header, a line without three
            fields, a bad time, an unknown parameter or a value that is not a finite number.
    """
    index = {name: i for i, name in enumerate(variables)}
    sums: dict[float, np.ndarray] = {}
    counts: dict[float, np.ndarray] = {}
    record_id = ""
    saw_header = False
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip().lstrip("\ufeff")
        if not saw_header:
            if line.replace(" ", "") != "Time,Parameter,Value":
                raise ValueError(
                    f"{source}:{lineno}: expected the header 'Time,Parameter,Value', got {line[:80]!r}"
                )
            saw_header = True
            continue
        if not line:
            continue
        fields = line.split(",")
        if len(fields) != 3:
            raise ValueError(
                f"{source}:{lineno}: expected 3 comma-separated fields (Time,Parameter,Value), "
                f"got {len(fields)}: {line[:80]!r}"
            )
        time_text, param, value_text = (f.strip() for f in fields)
        if param == "":  # the challenge files hold a few lines without a parameter: no measurement
            continue
        match = _TIME.match(time_text)
        if match is None:
            raise ValueError(f"{source}:{lineno}: bad time {time_text!r} (expected HH:MM since admission)")
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"{source}:{lineno}: value {value_text!r} of {param} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{source}:{lineno}: value {value_text!r} of {param} is not finite")
        if param == "RecordID":
            record_id = str(int(value)) if value.is_integer() else value_text
            continue
        if param not in VARIABLES:
            raise ValueError(
                f"{source}:{lineno}: unknown parameter {param!r}; PhysioNet 2012 has "
                f"{', '.join(VARIABLES)} (and RecordID)"
            )
        if param not in index or (param in DESCRIPTORS and value == -1):
            continue
        hours = int(match.group(1)) + int(match.group(2)) / 60.0
        if quantization_hours > 0:
            hours = round(round(hours / quantization_hours) * quantization_hours, 6)
        if hours not in sums:
            sums[hours], counts[hours] = np.zeros(len(variables)), np.zeros(len(variables))
        sums[hours][index[param]] += value
        counts[hours][index[param]] += 1
    if not saw_header:
        raise ValueError(f"{source}:1: empty file (expected the header 'Time,Parameter,Value')")
    times = np.array(sorted(sums), dtype=np.float64)
    if len(times) == 0:
        empty = np.zeros((0, len(variables)))
        return record_id, times, empty, empty.astype(bool)
    count = np.stack([counts[t] for t in times])
    values = np.stack([sums[t] for t in times]) / np.maximum(count, 1)
    return record_id, times, values, count > 0


class PhysioNetDataModule(SplitDataModule):
    """PhysioNet 2012 set-a as irregular series for the latent ODE (Rubanova et al. 2019).

    Args:
        root: a folder of ``<RecordID>.txt`` files (or holding ``set-a/`` or ``set-a.tar.gz``),
            or the path of ``set-a.tar.gz``.
        download: fetch ``set-a.tar.gz`` into ``root`` when it is missing (needs a network).
        variables: channel names (default: all 41 of :data:`VARIABLES`).
        quantization_hours: round times to multiples of this (Rubanova et al.: 0.1 h).
        observe_hours: the encoder reads the first ``observe_hours`` of 48.
        max_records: use only the first this many records (sorted by file name); ``None``: all.
        batch_size / val_fraction / test_fraction / seed: loaders and a fixed random split.
    """

    def __init__(
        self,
        root: str = "data/physionet",
        download: bool = False,
        variables: list[str] | None = None,
        quantization_hours: float = 0.1,
        observe_hours: float = 24.0,
        max_records: int | None = None,
        batch_size: int = 50,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        unknown = sorted(set(variables or ()) - set(VARIABLES))
        if unknown:
            raise ValueError(f"unknown PhysioNet variables {unknown}; choose from {', '.join(VARIABLES)}")
        if not 0 < observe_hours <= HORIZON_HOURS:
            raise ValueError(f"observe_hours={observe_hours} must be in (0, {HORIZON_HOURS:g}]")
        self.root, self.download = Path(root).expanduser(), download
        self.variables = tuple(variables) if variables else VARIABLES
        self.quantization_hours, self.observe_hours, self.max_records = (
            quantization_hours,
            observe_hours,
            max_records,
        )
        self.batch_size, self.val_fraction, self.test_fraction, self.seed = (
            batch_size,
            val_fraction,
            test_fraction,
            seed,
        )
        self.record_ids: dict[str, list[str]] = {}
        self.mean = self.std = None

    @property
    def num_features(self) -> int:
        return len(self.variables)

    @property
    def t_split(self) -> float:
        return self.observe_hours / HORIZON_HOURS

    @property
    def t_end(self) -> float:
        return 1.0

    # -- files ------------------------------------------------------------------------------
    def _archive(self) -> Path | None:
        if self.root.is_file() and self.root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return self.root
        candidate = self.root / "set-a.tar.gz"
        return candidate if candidate.is_file() else None

    def _folder(self) -> Path | None:
        for folder in (self.root / "set-a", self.root):
            if folder.is_dir() and any(folder.glob("*.txt")):
                return folder
        return None

    def prepare_data(self) -> None:
        if self._folder() is None and self._archive() is None:
            if not self.download:
                raise FileNotFoundError(
                    f"no PhysioNet 2012 records under {self.root} (a folder of <RecordID>.txt files, "
                    f"set-a/ or "
                    f"set-a.tar.gz); pass data.download=true (needs a network) or use data=spirals (embedded)"
                )
            self.root.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(URL, self.root / "set-a.tar.gz")

    def read_files(self) -> list[tuple[str, list[str]]]:
        """``(name, lines)`` of every record file, sorted by name (at most ``max_records``)."""
        self.prepare_data()
        folder = self._folder()
        out: list[tuple[str, list[str]]] = []
        if folder is not None:
            paths = sorted(folder.glob("*.txt"))[: self.max_records]
            return [(str(p), p.read_text(encoding="utf-8", errors="replace").splitlines()) for p in paths]
        archive = self._archive()
        assert archive is not None
        with tarfile.open(archive) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")), key=lambda m: m.name
            )[: self.max_records]
            for m in members:
                data = tar.extractfile(m)
                assert data is not None
                out.append(
                    (f"{archive}:{m.name}", data.read().decode("utf-8", errors="replace").splitlines())
                )
        return out

    # -- splits -----------------------------------------------------------------------------
    def make_splits(self) -> dict[str, IrregularDataset]:
        parsed = []
        for name, lines in self.read_files():
            rid, times, values, mask = parse_record(lines, name, self.variables, self.quantization_hours)
            if len(times):  # a stay with none of the chosen variables has nothing to encode
                parsed.append((rid or Path(name).stem, times, values, mask))
        if not parsed:
            raise ValueError(
                f"no PhysioNet record under {self.root} has an observation of {', '.join(self.variables)}"
            )
        train, val, test = split_indices(len(parsed), self.val_fraction, self.test_fraction, self.seed)
        values = np.concatenate([parsed[i][2] for i in train])
        mask = np.concatenate([parsed[i][3] for i in train])
        count = mask.sum(0)
        mean = np.where(count > 0, (values * mask).sum(0) / np.maximum(count, 1), 0.0)
        var = np.where(count > 1, (((values - mean) * mask) ** 2).sum(0) / np.maximum(count - 1, 1), 1.0)
        std = np.where(var > 1e-12, np.sqrt(var), 1.0)
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        splits = {}
        for split, idx in (("train", train), ("val", val), ("test", test)):
            records = []
            for i in idx:
                _, t, v, m = parsed[i]
                v = np.where(m, (v - mean) / std, 0.0)
                records.append(
                    IrregularRecord(
                        torch.tensor(t / HORIZON_HOURS, dtype=torch.float32),
                        torch.tensor(v, dtype=torch.float32),
                        torch.from_numpy(m),
                    )
                )
            splits[split] = IrregularDataset(records, self.t_split)
            self.record_ids[split] = [parsed[i][0] for i in idx]
        return splits
