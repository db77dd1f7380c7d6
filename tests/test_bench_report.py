"""The verdict functions every benchmark judges its goals with: they can say "missed", and a
missing measurement is never "met"."""

from __future__ import annotations

import math

import pytest

from nde_zoo.bench.report import (MET, MISSED, NOT_MEASURED, BenchReport, Check, Source, Table, Verdict,
                                  cell_interval, combine, judge, source_interval)


def test_numbers_that_miss_the_goal_say_missed():
    assert judge(2.81, "<=", 2.8) == MISSED
    assert judge(5.9, ">=", 6.0) == MISSED
    assert judge(2.8, "<=", 2.8) == MET and judge(6.0, ">=", 6.0) == MET


@pytest.mark.parametrize("measured", [None, math.nan, math.inf, -math.inf])
def test_a_missing_measurement_is_never_met(measured):
    assert judge(measured, "<=", 1.0) == NOT_MEASURED
    assert judge(measured, ">=", 1.0) == NOT_MEASURED


def test_a_goal_is_met_only_when_every_check_is():
    assert combine([MET, MET]) == MET
    assert combine([MET, MISSED]) == MISSED
    assert combine([MET, NOT_MEASURED]) == NOT_MEASURED
    assert combine([NOT_MEASURED, MISSED]) == MISSED
    with pytest.raises(ValueError, match="at least one check"):
        combine([])
    with pytest.raises(ValueError, match="op must be one of"):
        judge(1.0, "<", 2.0)


def _report(seconds_direct: str, seconds_rev: str) -> BenchReport:
    table = Table("t", ["strategy", "s / step"], [["Direct", seconds_direct], ["Reversible", seconds_rev]])
    measured = float(seconds_rev) / float(seconds_direct)
    check = Check("Reversible / Direct", measured, "<=", 2.8, Source(0, ("Reversible", "Direct"), ("s / step",),
                                                                      "ratio"), unit="x")
    return BenchReport("demo", "demo", [table], verdicts=[Verdict("time", "white dwarf", (check,))])


def test_a_verdict_line_is_computed_and_printed_from_its_numbers():
    report = _report("1.000", "3.100")
    verdict = report.verdicts[0]
    assert verdict.outcome == MISSED
    assert verdict.line() == "white dwarf: Reversible / Direct 3.10x (goal <= 2.80x): missed"
    assert "- white dwarf: Reversible / Direct 3.10x (goal <= 2.80x): missed" in report.markdown()
    data = report.as_dict()
    lo, hi = source_interval(data["tables"], data["verdicts"][0]["checks"][0]["source"])
    assert lo <= 3.1 <= hi and hi - lo < 0.005
    assert _report("1.000", "2.700").verdicts[0].outcome == MET


def test_a_missing_measurement_prints_na_and_is_not_met():
    check = Check("RSS ratio", None, ">=", 6.0, Source(0, ("x",), ("y",)))
    verdict = Verdict("memory", "midpoint", (check, Check("kept", 100.0, ">=", 6.0, Source(0, ("x",), ("y",)))))
    assert verdict.outcome == NOT_MEASURED
    assert verdict.line().startswith("midpoint: RSS ratio n/a (goal >= 6.00)")


def test_cells_stand_for_the_interval_they_print():
    assert cell_interval("2.79x") == pytest.approx((2.785, 2.795))
    assert cell_interval("1.7e-16") == pytest.approx((1.65e-16, 1.75e-16))
    assert cell_interval("93.9 +- 0.8") == pytest.approx((93.85, 93.95))
    assert cell_interval("3445x") == pytest.approx((3444.5, 3445.5))
    assert all(math.isnan(v) for v in cell_interval("n/a"))
    tables = [{"title": "t", "columns": ["m", "a", "b"],
               "rows": [["x", "1.00", "rejected: no"], ["y", "3.00", "2.0e-01"]]}]
    assert source_interval(tables, {"table": 0, "rows": ["x", "y"], "columns": ["a", "b"], "how": "max"}) == \
        pytest.approx((2.995, 3.005))
    assert source_interval(tables, {"table": 0, "rows": ["y", "x"], "columns": ["a"], "how": "diff"}) == \
        pytest.approx((1.99, 2.01))
    lo, hi = source_interval(tables, {"table": 0, "rows": ["x"], "columns": ["b"], "how": "value"})
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(KeyError, match="0 rows of table 't' start with"):
        source_interval(tables, {"table": 0, "rows": ["z"], "columns": ["a"], "how": "value"})
