"""`python -m nde_zoo bench gradients --quick`: exact strategies at round-off, adjoints not exact."""

from __future__ import annotations

import math

import pytest

from nde_zoo.bench import BENCHMARKS
from nde_zoo.bench.gradients import ADJOINTS, EXACT, EXACT_BAR, run


@pytest.fixture(scope="module")
def report():
    return run(quick=True)


def test_registered():
    assert "gradients" in BENCHMARKS


def test_exact_strategies_match_backprop_through_the_same_discretisation(report):
    cells = report.data["results"]["ode_classifier"]
    solvers = report.data["solvers"]
    assert len(solvers) >= 3
    for name in EXACT:
        for solver in solvers:
            cell = cells[name][solver]
            assert "same_max" in cell, (name, solver, cell)  # none of them rejects a solver
            assert cell["same_max"] <= EXACT_BAR, (name, solver, cell["same"])
            assert cell["same"]["all"] <= EXACT_BAR
            assert set(cell["same"]) == {"embed", "field", "head", "all"}


def test_adjoints_are_not_exact_but_near_their_tolerance(report):
    cells = report.data["results"]["ode_classifier"]
    measured = 0
    for name in ADJOINTS:
        for solver, cell in cells[name].items():
            if "rejected" in cell:
                continue
            err = cell["same_max"]
            assert math.isfinite(err) and err > 1e-14, (name, solver, err)
            measured += 1
            if solver == "dopri5":  # adaptive: of the order of rtol, not of the discretisation
                assert err <= report.data["adjoint_factor"] * report.data["rtol"], (name, err)
    assert measured >= 2 * len(ADJOINTS)
    # torchdiffeq has no classic rk4 (its "rk4" is the 3/8 rule): the cell says why
    assert "torchdiffeq" in cells["adjoint"]["rk4"]["rejected"]


def test_discretisation_error_dominates_the_exact_strategies_error(report):
    cells = report.data["results"]["ode_classifier"]
    for solver in report.data["solvers"]:
        direct = cells["direct"][solver]
        assert direct["same_max"] == 0.0  # the same computation twice: bitwise equal
        assert direct["tight_max"] > 100 * EXACT_BAR  # 4 steps / rtol 1e-6 are far from the exact flow
    # lower order, larger discretisation error
    assert cells["direct"]["midpoint"]["tight_max"] > cells["direct"]["rk4"]["tight_max"]


def test_tables_and_notes_are_computed(report):
    assert report.name == "gradients"
    same = report.tables[0]
    assert [row[0] for row in same.rows] == [*EXACT, *ADJOINTS]
    assert any(row[0] == "adjoint" and row[2].startswith("rejected") for row in same.rows)
    assert any("15/15 cells" in note for note in report.notes), report.notes
