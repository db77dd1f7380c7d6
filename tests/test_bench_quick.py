"""Every ``python -m nde_zoo bench NAME --quick`` runs, prints the tables it should, and every
"met"/"missed" it prints is a verdict recomputed here from the numbers in its own tables.

(The full-size figures are in docs/benchmarks.md; these runs are the same code at a small size.)
"""

from __future__ import annotations

import importlib
import math
import re

import pytest

from nde_zoo.bench import BENCHMARKS
from nde_zoo.bench.report import combine, judge, source_interval

#: bench -> the titles (their start) of the tables its quick run must print, in order
EXPECTED_TABLES = {
    "solver_overhead": ["Milliseconds per solve and ratio to torchdiffeq"],
    "gradients": ["ODE classifier, digits", "ODE classifier, digits"],
    "white_dwarf": ["Training on the white dwarf equation", "Time-memory frontier",
                    "Linear stability", "Memory-bound regime", "Peak RSS growth"],
    "ernode": ["digits: ODE classifier"],
    "symplectic": ["KdV small", "CNF two moons"],
    "cnf_memory": ["CNF on two moons: test NLL and memory"],
    "seminorm": ["Neural CDE on JapaneseVowels", "The same CDE on JapaneseVowels", "Neural ODE (spiral demo"],
    "cde_memory": ["JapaneseVowels: Neural CDE"],
    "auto": ["Plan against real training steps"],
}
VERDICT_WORD = re.compile(r"\b(met|missed)\b", re.I)
NAMES = sorted(BENCHMARKS)
#: benches that still judge their goals with their own code, not nde_zoo.bench.report's Verdicts:
#: they run here at --quick size, but their goal lines are not recomputed from their tables yet.
#: bench compiled (the lead's, landed 2026-12-02) has its own verdict(): computed from its measured
#: ratios and "not measured" when one is missing, but its diffrax goals divide across two tables.
OWN_VERDICTS = {"compiled"}
JUDGED = [n for n in NAMES if n not in OWN_VERDICTS]
#: quick runs that take over a minute on a 2-core machine (the suite's per-test limit): marked slow
SLOW = {"auto", "seminorm"}
pytestmark = pytest.mark.e2e


def _names(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def test_every_benchmark_says_which_tables_it_prints():
    assert set(EXPECTED_TABLES) <= set(BENCHMARKS)


@pytest.mark.parametrize("name", _names(NAMES))
def test_quick_run_prints_its_tables(bench_quick, name):
    report, markdown = bench_quick(name)
    titles = [t["title"] for t in report["tables"]]
    expected = EXPECTED_TABLES.get(name)
    assert titles, f"{name} printed no table"
    if expected is not None:
        assert len(titles) == len(expected), titles
        for title, start in zip(titles, expected, strict=True):
            assert title.startswith(start), (title, start)
    for table in report["tables"]:
        assert table["rows"] and all(len(r) == len(table["columns"]) for r in table["rows"]), table["title"]
        assert f"**{table['title']}**" in markdown


@pytest.mark.parametrize("name", _names(JUDGED))
def test_every_goal_it_names_gets_a_verdict(bench_quick, name):
    report, _ = bench_quick(name)
    goals = importlib.import_module(f"nde_zoo.bench.{name}").GOALS
    assert goals, f"nde_zoo.bench.{name}.GOALS is empty"
    assert {v["goal"] for v in report["verdicts"]} == set(goals)
    for text in goals.values():  # the summary names each goal as the verdicts judge it
        assert text in report["summary"], text


@pytest.mark.parametrize("name", _names(JUDGED))
def test_every_met_or_missed_line_is_a_verdict(bench_quick, name):
    report, markdown = bench_quick(name)
    lines = {f"- {v['line']}" for v in report["verdicts"]}
    said = [line for line in markdown.splitlines() if VERDICT_WORD.search(line)]
    assert said, f"{name} prints no verdict"
    stray = [line for line in said if line not in lines]
    assert not stray, f"lines saying met/missed that no verdict computed: {stray}"
    assert lines <= set(markdown.splitlines())


@pytest.mark.parametrize("name", _names(JUDGED))
def test_verdicts_are_computed_from_the_numbers_in_the_report(bench_quick, name):
    report, _ = bench_quick(name)
    for verdict in report["verdicts"]:
        outcomes = []
        for check in verdict["checks"]:
            measured = check["measured"]
            assert check["outcome"] == judge(measured, check["op"], check["bar"]), check
            outcomes.append(check["outcome"])
            lo, hi = source_interval(report["tables"], check["source"])
            if measured is None or not math.isfinite(measured):
                assert check["outcome"] == "not measured"
                continue
            assert not math.isnan(lo), f"{check['what']}: its source cells hold no number: {check['source']}"
            slack = 1e-9 * max(abs(lo), abs(hi), 1e-300)
            assert lo - slack <= measured <= hi + slack, (
                f"{verdict['case']}: {check['what']} = {measured} is not what the cells "
                f"{check['source']} print ({lo}..{hi})")
            value = format(measured, check["fmt"]) + check["unit"]
            assert value in verdict["line"]
        assert verdict["outcome"] == combine(outcomes)
        assert verdict["line"].endswith(": " + verdict["outcome"])
