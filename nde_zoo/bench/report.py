"""What a benchmark returns, and how it judges its goals; the runner writes it out.

A goal's verdict is never typed in: a :class:`Check` holds the measured number, the bar
and where in the report's tables the number comes from (:class:`Source`), and
:func:`judge` turns them into ``"met"``, ``"missed"`` or ``"not measured"`` (a missing or
non-finite measurement is never met). A :class:`Verdict` joins the checks of one goal on
one case; its line is the only place a report says "met" or "missed", and
``tests/test_bench_quick.py`` recomputes every one of them from the tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BenchReport", "Table", "Check", "Source", "Verdict", "judge", "combine", "cell_interval",
           "source_interval", "MET", "MISSED", "NOT_MEASURED"]

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"
_OPS = ("<=", ">=")
_COMBINES = ("value", "ratio", "diff", "absdiff", "max", "min", "ratio_to_min")


def judge(measured: float | None, op: str, bar: float) -> str:
    """``"met"`` when ``measured op bar`` holds, ``"missed"`` when it does not, and
    ``"not measured"`` when ``measured`` is None or not finite (never counted as met).

    >>> judge(2.79, "<=", 2.8), judge(3.0, "<=", 2.8), judge(None, ">=", 6.0)
    ('met', 'missed', 'not measured')
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    if measured is None or not math.isfinite(float(measured)):
        return NOT_MEASURED
    ok = measured <= bar if op == "<=" else measured >= bar
    return MET if ok else MISSED


def combine(outcomes: list[str]) -> str:
    """One goal's outcome from its checks': missed if any is, else not measured if any is, else met."""
    if not outcomes:
        raise ValueError("a verdict needs at least one check")
    if MISSED in outcomes:
        return MISSED
    return NOT_MEASURED if NOT_MEASURED in outcomes else MET


@dataclass(frozen=True)
class Source:
    """Where a measured number sits in the report: cells of ``tables[table]``.

    ``rows`` name rows by their leading cells (a string matches the first cell, a list the
    first few); ``columns`` are headers. ``how`` combines the cells, in ``rows`` x
    ``columns`` order: ``value`` (one cell), ``ratio`` (first / second), ``diff`` (first -
    second), ``absdiff``, ``max``, ``min`` (over the cells that hold a number),
    ``ratio_to_min`` (first / min of the rest).
    """

    table: int
    rows: tuple[Any, ...]
    columns: tuple[str, ...]
    how: str = "value"

    def __post_init__(self) -> None:
        if self.how not in _COMBINES:
            raise ValueError(f"Source.how must be one of {_COMBINES}, got {self.how!r}")


@dataclass(frozen=True)
class Check:
    """One comparison: ``what`` measured ``op`` ``bar``.

    ``fmt`` formats both numbers, ``unit`` follows them (``"x"`` for ratios).
    """

    what: str
    measured: float | None
    op: str
    bar: float
    source: Source
    fmt: str = ".2f"
    unit: str = ""

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Check.op must be one of {_OPS}, got {self.op!r}")

    @property
    def outcome(self) -> str:
        return judge(self.measured, self.op, self.bar)

    def text(self) -> str:
        value = "n/a" if self.measured is None or not math.isfinite(float(self.measured)) else \
            f"{self.measured:{self.fmt}}{self.unit}"
        return f"{self.what} {value} (goal {self.op} {self.bar:{self.fmt}}{self.unit})"


@dataclass(frozen=True)
class Verdict:
    """The outcome of goal ``goal`` (an id of the benchmark's ``GOALS``) on ``case``."""

    goal: str
    case: str
    checks: tuple[Check, ...]

    @property
    def outcome(self) -> str:
        return combine([c.outcome for c in self.checks])

    def line(self) -> str:
        return f"{self.case}: " + "; ".join(c.text() for c in self.checks) + f": {self.outcome}"

    def as_dict(self) -> dict[str, Any]:
        return {"goal": self.goal, "case": self.case, "outcome": self.outcome, "line": self.line(),
                "checks": [{**asdict(c), "outcome": c.outcome} for c in self.checks]}


@dataclass
class Table:
    """One markdown table: ``columns`` headers, ``rows`` of already-formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class BenchReport:
    """A benchmark's result.

    Attributes:
        name: the benchmark's registry name (``"white_dwarf"``).
        summary: a markdown paragraph: what is measured, on what, and the goals it checks.
        tables: the tables to print and append to ``docs/benchmarks.md``.
        data: raw figures, written as JSON.
        figures: ``{file_stem: matplotlib Figure}``, saved as PNG next to the JSON.
        notes: markdown bullet lines (caveats, context); never a verdict.
        verdicts: one per goal and case, printed after the notes.
    """

    name: str
    summary: str
    tables: list[Table]
    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [self.summary, *(t.markdown() for t in self.tables)]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        if self.verdicts:
            parts.append("Goals:\n\n" + "\n".join(f"- {v.line()}" for v in self.verdicts))
        return "\n\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Everything but the figures, for ``<name>.json``."""
        return {"name": self.name, "summary": self.summary,
                "tables": [asdict(t) for t in self.tables], "notes": self.notes,
                "verdicts": [v.as_dict() for v in self.verdicts], "data": self.data}


# -- recomputing a measured number from the printed cells ---------------------------------------
_NUMBER = re.compile(r"[-+]?(\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?")


def cell_interval(cell: str) -> tuple[float, float]:
    """The interval a printed cell stands for: its first number +- half a unit in its last digit.

    ``"2.79x"`` -> (2.785, 2.795); ``"1.7e-16"`` -> (1.65e-16, 1.75e-16); ``"93.9 +- 0.8"``
    uses 93.9. A cell with no number ("n/a", "rejected: ...") is (nan, nan).
    """
    match = _NUMBER.search(str(cell))
    if not match:
        return math.nan, math.nan
    value = float(match.group(0))
    decimals = len(match.group(2) or "")
    exponent = int(match.group(3) or 0)
    half = 0.5 * 10.0 ** (exponent - decimals)
    return value - half, value + half


def _row(table: dict[str, Any], key: Any) -> list[str]:
    key = [key] if isinstance(key, str) else list(key)
    found = [r for r in table["rows"] if [str(c) for c in r[: len(key)]] == key]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows of table {table['title']!r} start with {key}")
    return found[0]


def source_interval(tables: list[dict[str, Any]], source: dict[str, Any]) -> tuple[float, float]:
    """Bounds on a check's measured number from the printed cells its ``source`` names.

    ``tables`` and ``source`` are as written to JSON (``BenchReport.as_dict``).
    """
    table = tables[source["table"]]
    cols = [table["columns"].index(c) for c in source["columns"]]
    cells = [cell_interval(_row(table, r)[c]) for r in source["rows"] for c in cols]
    how = source["how"]
    if how in ("max", "min"):  # over the cells that hold a number ("rejected: ..." holds none)
        cells = [c for c in cells if not math.isnan(c[0])]
    if not cells or any(math.isnan(lo) for lo, _ in cells):
        return math.nan, math.nan
    if how == "value":
        return cells[0]
    if how == "max":
        return max(lo for lo, _ in cells), max(hi for _, hi in cells)
    if how == "min":
        return min(lo for lo, _ in cells), min(hi for _, hi in cells)
    if how in ("diff", "absdiff"):
        (alo, ahi), (blo, bhi) = cells[:2]
        lo, hi = alo - bhi, ahi - blo
        if how == "absdiff":
            lo, hi = (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
        return lo, hi
    (alo, ahi), rest = cells[0], cells[1:]
    if how == "ratio":
        rest = rest[:1]
    blo, bhi = min(lo for lo, _ in rest), min(hi for _, hi in rest)
    if blo <= 0:  # a denominator printed as 0.00 bounds nothing
        return -math.inf, math.inf
    quotients = [alo / blo, alo / bhi, ahi / blo, ahi / bhi]
    return min(quotients), max(quotients)
