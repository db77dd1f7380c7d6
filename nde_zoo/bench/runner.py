"""``python -m nde_zoo bench NAME [--quick] [--out DIR] [--docs]``.

Runs ``nde_zoo.bench.<NAME>.run(quick)``, prints its markdown, writes
``<out>/<name>.json`` (summary, tables, notes, verdicts and raw data), ``<out>/<name>.md`` and one PNG per figure, and (full runs, or
``--docs``) puts the section ``## <name>`` in ``docs/benchmarks.md`` with the command that
produced it, replacing an earlier section of the same name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from nde_zoo.bench import BENCHMARKS
from nde_zoo.bench.report import BenchReport

T = TypeVar("T")

__all__ = ["main", "write_report", "docs_path", "on_one_thread"]


def on_one_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with torch on one thread (a shared 2-core machine: extra threads
    only contend), the caller's thread count put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def docs_path() -> Path:
    """``docs/benchmarks.md`` of the source checkout (or of the current directory)."""
    repo = Path(__file__).resolve().parents[2]
    root = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return root / "docs" / "benchmarks.md"


def _machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {device}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def _section(report: BenchReport, command: str) -> str:
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"## {report.name}\n\n"
        f"Command: `{command}`  \nRun: {stamp} on {_machine()}.\n\n{report.markdown()}\n"
    )


def _update_docs(path: Path, name: str, section: str) -> None:
    text = path.read_text() if path.is_file() else (
        "# Benchmarks\n\nEach section is written by `python -m nde_zoo bench NAME`, which measures "
        "ratios side by side in one run; rerun the command to reproduce it. A section's goal lines are "
        "computed by `nde_zoo.bench.report.judge` from the numbers in its own tables; a missing measurement is never met.\n"
    )
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def write_report(report: BenchReport, out: Path, command: str, docs: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{report.name}.json").write_text(json.dumps(report.as_dict(), indent=2, default=str))
    (out / f"{report.name}.md").write_text(_section(report, command))
    for stem, figure in report.figures.items():
        target = out / f"{report.name}_{stem}.png"
        figure.savefig(target, dpi=120, bbox_inches="tight")
        if docs is not None:
            assets = docs.parent / "img"
            assets.mkdir(parents=True, exist_ok=True)
            figure.savefig(assets / target.name, dpi=120, bbox_inches="tight")
    if docs is not None:
        section = _section(report, command)
        images = "".join(f"\n![{stem}](img/{report.name}_{stem}.png)\n" for stem in report.figures)
        _update_docs(docs, report.name, section + images)


def main(argv: list[str] | None = None) -> BenchReport | None:
    parser = argparse.ArgumentParser(prog="nde-zoo bench", description="Run a benchmark.")
    parser.add_argument("name", nargs="?", help="benchmark name (--list shows them)")
    parser.add_argument("--quick", action="store_true", help="a small, fast version (smoke test)")
    parser.add_argument("--out", default="bench_out", help="folder for JSON/markdown/PNG outputs")
    parser.add_argument("--docs", action="store_true", help="also update docs/benchmarks.md with --quick")
    parser.add_argument("--list", action="store_true", help="list the benchmarks")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name, what in sorted(BENCHMARKS.items()):
            print(f"{name:>16}  {what}")
        if not args.name and not args.list:
            raise SystemExit(2)
        return None
    if args.name not in BENCHMARKS:
        print(
            f"error: unknown benchmark {args.name!r}; valid benchmarks: {', '.join(sorted(BENCHMARKS))}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    module = importlib.import_module(f"nde_zoo.bench.{args.name}")
    report: BenchReport = module.run(quick=args.quick)
    command = "python -m nde_zoo bench " + " ".join(argv if argv is not None else sys.argv[2:])
    # a benchmark's own settings from the environment (e.g. which problems ran) belong to its command
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("NDE_ZOO_BENCH_"))
    command = " ".join([*settings, command])
    docs = docs_path() if (not args.quick or args.docs) else None
    write_report(report, Path(args.out), command, docs)
    print(report.markdown())
    return report
