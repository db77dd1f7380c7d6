"""What a benchmark returns; the runner (``python -m nde_zoo bench NAME``) writes it out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BenchReport", "Table"]


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
        summary: a markdown paragraph: what is measured, on what, and the goal it checks.
        tables: the tables to print and append to ``docs/benchmarks.md``.
        data: raw figures, written as JSON.
        figures: ``{file_stem: matplotlib Figure}``, saved as PNG next to the JSON.
        notes: markdown bullet lines (goals met or missed, caveats).
    """

    name: str
    summary: str
    tables: list[Table]
    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [self.summary, *(t.markdown() for t in self.tables)]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)
