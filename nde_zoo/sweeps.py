"""One table of every run under a folder: a sweep's jobs side by side.

``python -m nde_zoo fit -m ...`` writes each job to ``multirun/<subcommand>/<time>/<job>/`` and, at
the end of the sweep, ``sweep.csv`` and ``sweep.md`` next to them (:class:`SweepTable`, a Hydra
callback registered in configs/base.yaml). ``python -m nde_zoo table FOLDER`` builds the same table
for any earlier folder (``multirun/fit/<time>``, ``outputs/``, or one run directory): every run
below it, i.e. every directory holding ``.hydra/overrides.yaml``.

A row per run: its overrides (one column per key; ``-`` where a run did not give it), whether it
finished, the epochs it logged, the best ``val/loss`` and its epoch, the final value of every
validation and test figure, the median seconds per training step (``time/step_s``), the compile
seconds (``time/compile_s``) and the peak memory (``memory/peak_bytes``), the last three logged by
:class:`nde_zoo.callbacks.StepTimer`. Figures come from the CSV logger
(``csv/version_*/metrics.csv``); a run logged only to TensorBoard shows its overrides alone.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

__all__ = ["SweepTable", "find_runs", "read_metrics", "summarise", "sweep_table", "write_table", "main"]

log = logging.getLogger("nde_zoo")

#: the file names :func:`write_table` writes into the folder.
CSV_NAME, MARKDOWN_NAME = "sweep.csv", "sweep.md"
FIXED_COLUMNS = ("status", "epochs", "best val/loss", "best epoch")
TIME_COLUMNS = ("s per step", "compile s", "peak memory MB")


def _natural(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def find_runs(folder: str | Path) -> list[Path]:
    """The run directories under ``folder`` (itself included): those holding ``.hydra/overrides.yaml``."""
    folder = Path(folder)
    runs = {p.parent.parent for p in folder.rglob(".hydra/overrides.yaml")}
    return sorted(runs, key=_natural)


def _overrides(run: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml")]


def read_metrics(run: Path) -> list[dict[str, float]]:
    """Every row the CSV logger wrote for ``run`` (all its versions, in order), as ``{column: value}``."""
    rows: list[dict[str, float]] = []
    files = sorted(run.glob("csv/version_*/metrics.csv"), key=_natural)
    for file in files:
        with open(file, newline="") as handle:
            for row in csv.DictReader(handle):
                values = {}
                for key, text in row.items():
                    if key is None or text in (None, ""):
                        continue
                    try:
                        values[key] = float(text)
                    except ValueError:
                        continue
                rows.append(values)
    return rows


def _last(rows: list[dict[str, float]], key: str) -> float | None:
    for row in reversed(rows):
        if key in row and math.isfinite(row[key]):
            return row[key]
    return None


def summarise(run: Path) -> dict[str, Any]:
    """One run's row: ``{"job", "overrides", column: value, ...}`` (see the module docstring)."""
    rows = read_metrics(run)
    keys = [k for row in rows for k in row]
    figures = list(dict.fromkeys(k for k in keys if k.startswith(("val/", "test/"))))
    out: dict[str, Any] = {"overrides": _overrides(run)}
    finished = any(k.startswith("test/") for k in keys) or (run / "checkpoints" / "last.ckpt").is_file()
    out["status"] = "finished" if finished and rows else ("no metrics" if not rows else "unfinished")
    epochs = [
        row["epoch"]
        for row in rows
        if "epoch" in row and any(k.startswith(("train/", "val/", "time/")) for k in row)
    ]
    out["epochs"] = int(max(epochs)) + 1 if epochs else None
    val = [
        (row["val/loss"], row.get("epoch"))
        for row in rows
        if "val/loss" in row and math.isfinite(row["val/loss"])
    ]
    if val:
        best, epoch = min(val, key=lambda v: v[0])
        out["best val/loss"], out["best epoch"] = best, None if epoch is None else int(epoch)
    for key in figures:
        out[key if key.startswith("test/") else f"final {key}"] = _last(rows, key)
    steps = [row["time/step_s"] for row in rows if "time/step_s" in row]
    out["s per step"] = statistics.median(steps) if steps else None
    out["compile s"] = _last(rows, "time/compile_s")
    peaks = [row["memory/peak_bytes"] for row in rows if row.get("memory/peak_bytes")]  # 0: not measured
    out["peak memory MB"] = max(peaks) / 1e6 if peaks else None
    return out


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def sweep_table(folder: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)`` of every run under ``folder``; ``job`` is the run's path relative to it."""
    folder = Path(folder)
    rows, override_keys, figure_keys = [], [], []
    for run in find_runs(folder):
        row = summarise(run)
        row["job"] = str(run.relative_to(folder)) if run != folder else "."
        for override in row.pop("overrides"):
            key, value = _split(override)
            row[key] = value
            if key not in override_keys:
                override_keys.append(key)
        for key in row:
            if key.startswith(("final ", "test/")) and key not in figure_keys:
                figure_keys.append(key)
        rows.append(row)
    figure_keys.sort(key=lambda k: (k.startswith("test/"), k))
    columns = ["job", *override_keys, *FIXED_COLUMNS, *figure_keys, *TIME_COLUMNS]
    return columns, rows


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """The table as Markdown (numbers to 4 significant digits; ``-``: not logged or not given).

    An override every run gave with the same value is said once, above the table, not as a column.
    """
    overrides = columns[1 : columns.index(FIXED_COLUMNS[0])]
    common = [
        k
        for k in overrides
        if len(rows) > 1
        and "-" != _text(rows[0].get(k))
        and all(_text(r.get(k)) == _text(rows[0].get(k)) for r in rows)
    ]
    columns = [c for c in columns if c not in common]
    lines = [f"Every run: {' '.join(f'{k}={_text(rows[0][k])}' for k in common)}", ""] if common else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_text(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def write_table(folder: str | Path, out: str | Path | None = None) -> tuple[Path, Path, str]:
    """Write ``sweep.csv`` and ``sweep.md`` for the runs under ``folder`` into ``out`` (default: ``folder``).

    Returns the two paths and the Markdown text.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    columns, rows = sweep_table(folder)
    if not rows:
        raise FileNotFoundError(
            f"no runs under {folder}: a run directory holds .hydra/overrides.yaml (outputs/<subcommand>/... "
            f"or multirun/<subcommand>/<time>/<job>)"
        )
    target = Path(out) if out is not None else folder
    target.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = target / CSV_NAME, target / MARKDOWN_NAME
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    text = markdown(columns, rows)
    md_path.write_text(text + "\n")
    return csv_path, md_path, text


class SweepTable(Callback):
    """Hydra callback: at the end of a multirun, write the sweep's table into its folder and print it."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        try:
            csv_path, md_path, text = write_table(folder)
        except Exception as exc:  # noqa: BLE001  (the sweep itself succeeded; say why there is no table)
            log.warning("no sweep table for %s: %s: %s", folder, type(exc).__name__, exc)
            return
        print(f"\n{text}\n", file=sys.stderr)
        log.info("sweep table of %s: %s and %s", folder, csv_path, md_path)


def main(argv: Sequence[str] | None = None) -> int:
    """``nde-zoo table FOLDER [FOLDER...] [--out DIR]``: print the table, write sweep.csv and sweep.md."""
    parser = argparse.ArgumentParser(
        prog="nde-zoo table",
        description="One table of every run under FOLDER (a multirun/<subcommand>/<time> sweep, outputs/, "
        "or a run directory): overrides, best and final metrics, seconds per step, compile "
        f"seconds, peak memory. Writes {CSV_NAME} and {MARKDOWN_NAME} into FOLDER (or --out) and "
        "prints it.",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    parser.add_argument("--out", type=Path, default=None, help="where to write the files (one FOLDER only)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out is not None and len(args.folders) > 1:
        parser.error("--out takes one FOLDER")
    status = 0
    for folder in args.folders:
        try:
            csv_path, md_path, text = write_table(folder, args.out)
        except (FileNotFoundError, PermissionError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(text)
        print(f"\nwritten: {csv_path}, {md_path}", file=sys.stderr)
    return status
