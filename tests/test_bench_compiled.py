"""bench compiled: its verdicts are computed from the measured ratios and can say "missed"."""

from __future__ import annotations

import pytest

from nde_zoo.bench.compiled import verdict


def test_verdict_says_missed_when_the_ratio_falls_short():
    assert verdict("goal", 19.9, 20.0, at_least=True) == "goal: missed (19.9x)"
    assert verdict("goal", 25.0, 20.0, at_least=True) == "goal: met (25x)"
    assert verdict("goal", 1.2, 1.0, at_least=False) == "goal: missed (1.2x)"
    assert verdict("goal", None, 1.0, at_least=False) == "goal: not measured"


def test_the_problems_can_be_narrowed_by_name(monkeypatch):
    from nde_zoo.bench.compiled import PROBLEMS, PROBLEMS_ENV, _chosen_problems

    monkeypatch.delenv(PROBLEMS_ENV, raising=False)
    assert _chosen_problems() == list(PROBLEMS)
    monkeypatch.setenv(PROBLEMS_ENV, "memory_bound, white_dwarf")
    assert _chosen_problems() == ["memory_bound", "white_dwarf"]
    monkeypatch.setenv(PROBLEMS_ENV, "white_dwarf,lorenz")
    with pytest.raises(ValueError, match=r"unknown problems \['lorenz'\]: choose among white_dwarf"):
        _chosen_problems()


def test_the_driver_share_comes_from_the_programs_own_clock():
    """A compiled row's driver share: the solve's time less the time in its program calls, as a
    share of the training step; an eager row has none."""
    from nde_zoo.bench.compiled import _probe_here

    compiled = _probe_here("white_dwarf", "checkpoint", True, 20, 2, "aot_eager")
    assert "error" not in compiled, compiled
    assert compiled["compiles"] == 2 and 0.0 < compiled["driver_fraction"] < 1.0
    eager = _probe_here("white_dwarf", "checkpoint", False, 20, 2, "aot_eager")
    assert eager["driver_fraction"] is None


def test_the_adaptive_problem_solves_adaptively_for_every_strategy():
    """``cnf_dopri5`` gives every strategy dopri5 at its tolerance (Checkpoint: every accepted step
    start, no snapshot count), compiled or not."""
    from nde_zoo.bench.compiled import PROBLEMS, STRATEGY_NAMES, _strategy

    for name in STRATEGY_NAMES:
        for compiled in (False, True):
            strategy = _strategy(name, "cnf_dopri5", PROBLEMS["cnf_dopri5"]["steps"], compiled)
            assert strategy.stepping.adaptive and strategy.stepping.rtol == strategy.stepping.atol == 1e-5
            assert strategy.tableau.name == "dopri5" and strategy.compile.enabled == compiled
