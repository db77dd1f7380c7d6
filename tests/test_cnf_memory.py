"""The cnf_memory benchmark's quick form: rows train, memory is measured, the report reads its figures."""

from __future__ import annotations

import pytest

from nde_zoo.bench import BENCHMARKS
from nde_zoo.bench.cnf_memory import goal_verdicts


@pytest.mark.xdist_group("bench_quick:cnf_memory")  # beside test_bench_quick.py's, which share its run
def test_quick_run_measures_nll_and_memory(bench_quick):
    assert "cnf_memory" in BENCHMARKS
    report, _ = bench_quick("cnf_memory")
    res = report["data"]["results"]["midpoint"]
    assert set(res["test_nll"]) == {"Direct", "Reversible"}
    # the same initial flow, batches and a nearly identical discretisation: the same test NLL
    assert abs(res["test_nll"]["Reversible"] - res["test_nll"]["Direct"]) < 0.02
    # Reversible keeps almost nothing for backward; both probes measured a positive RSS growth
    assert res["kept"]["Direct"] > 20 * res["kept"]["Reversible"] > 0
    assert all(v is None or v > 0 for v in res["rss"].values())
    assert res["probe_nfe"]["Reversible"] == 2 * res["probe_nfe"]["Direct"]  # two increments per step
    table = report["tables"][0]
    assert [r[:2] for r in table["rows"]] == [["midpoint", "Direct"], ["midpoint", "Reversible"]]
    assert [v["goal"] for v in report["verdicts"]] == ["memory", "nll"]
    assert "(goal >= 6.0x)" in report["verdicts"][0]["line"]


def _result(rss_direct, rss_reversible, nll_gap=0.0):
    return {"kept": {"Direct": 60e6, "Reversible": 2e4},
            "rss": {"Direct": rss_direct, "Reversible": rss_reversible},
            "test_nll": {"Direct": 1.46, "Reversible": 1.46 + nll_gap}}


def test_a_missing_rss_reading_is_not_met():
    memory, nll = goal_verdicts("midpoint", _result(None, 7e6))
    assert memory.outcome == "not measured" and nll.outcome == "met"
    assert "peak RSS growth n/a" in memory.line()
    memory, _ = goal_verdicts("midpoint", _result(60e6, None))
    assert memory.outcome == "not measured"


def test_numbers_below_the_bars_say_missed():
    memory, nll = goal_verdicts("dopri5", _result(40e6, 20e6, nll_gap=0.05))  # RSS only 2x, NLL 0.05 apart
    assert memory.outcome == "missed" and nll.outcome == "missed"
    memory, _ = goal_verdicts("midpoint", _result(64e6, 7e6))
    assert memory.outcome == "met"
