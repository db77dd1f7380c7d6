"""The README's capability matrix is the one the code declares."""

from __future__ import annotations

from pathlib import Path

from nde_zoo.capabilities import END, START, capability_matrix, matrix_markdown
from nde_zoo.configs_path import config_dir

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_matrix_is_generated_from_the_code():
    text = README.read_text()
    assert START in text and END in text
    shown = text.split(START)[1].split(END)[0].strip()
    assert shown == matrix_markdown(), "run `python -m nde_zoo.capabilities` to refresh README.md"


#: the rule, written here and not read from the code: SDE models take these strategies only
SDE_MODELS = {"sde", "latent_sde"}
SDE_STRATEGIES = {"adjoint", "direct", "ernode", "reversible"}


def test_matrix_covers_every_model_and_strategy_config():
    """One cell per (configs/model/*.yaml, configs/strategy/*.yaml) pair, each as the rule says."""
    models = {p.stem for p in (config_dir() / "model").glob("*.yaml")}
    strategies = {p.stem for p in (config_dir() / "strategy").glob("*.yaml")}
    assert {"ode_classifier", "cnf", "latent_ode", "cde", "sde", "latent_sde"} <= models
    assert {"direct", "checkpoint", "adjoint", "seminorm", "reversible", "symplectic", "ernode"} <= strategies
    matrix = capability_matrix()
    assert set(matrix) == {(m, s) for m in models for s in strategies}
    rule = {(m, s): m not in SDE_MODELS or s in SDE_STRATEGIES for m, s in matrix}
    wrong = {cell: ok for cell, ok in matrix.items() if ok != rule[cell]}
    assert not wrong, f"cells that disagree with the rule: {wrong}"
