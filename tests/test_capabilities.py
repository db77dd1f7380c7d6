"""The README's capability matrix is the one the code declares."""

from __future__ import annotations

from pathlib import Path

from nde_zoo.capabilities import END, START, capability_matrix, matrix_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_matrix_is_generated_from_the_code():
    text = README.read_text()
    assert START in text and END in text
    shown = text.split(START)[1].split(END)[0].strip()
    assert shown == matrix_markdown(), "run `python -m nde_zoo.capabilities` to refresh README.md"


def test_matrix_covers_every_model_and_strategy_config():
    matrix = capability_matrix()
    assert ("ode_classifier", "direct") in matrix and matrix[("ode_classifier", "direct")]
