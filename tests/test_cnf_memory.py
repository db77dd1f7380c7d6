"""The cnf_memory benchmark's quick form: rows train, memory is measured, the report reads its figures."""

from __future__ import annotations

from nde_zoo.bench import BENCHMARKS
from nde_zoo.bench.cnf_memory import run


def test_quick_run_measures_nll_and_memory():
    assert "cnf_memory" in BENCHMARKS
    report = run(quick=True)
    res = report.data["results"]["midpoint"]
    assert set(res["test_nll"]) == {"Direct", "Reversible"}
    # the same initial flow, batches and a nearly identical discretisation: the same test NLL
    assert abs(res["test_nll"]["Reversible"] - res["test_nll"]["Direct"]) < 0.02
    # Reversible keeps almost nothing for backward; both probes measured a positive RSS growth
    assert res["kept"]["Direct"] > 20 * res["kept"]["Reversible"] > 0
    assert all(v is None or v > 0 for v in res["rss"].values())
    assert res["probe_nfe"]["Reversible"] == 2 * res["probe_nfe"]["Direct"]  # two increments per step
    table = report.tables[0]
    assert [r[:2] for r in table.rows] == [["midpoint", "Direct"], ["midpoint", "Reversible"]]
    assert "goal >= 6x" in report.notes[0]
