"""The README in the order people read it (set-up, use, strategies and models, clusters), with the
memory terms of the strategy table defined, a glossary of every figure the code logs and every
picture it writes, and GPU guidance."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", README, flags=re.S | re.M)
    assert match, title
    return match.group(1)


def test_sections_come_in_reading_order():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    order = [headings.index(h) for h in ("Set-up", "Use", "Strategies", "Models", "Clusters")]
    assert order == sorted(order), headings
    setup = _section("Set-up")
    assert setup.index("python3") < setup.index("make fit")  # the requirements before the commands
    assert "lr 5e-3" not in setup and "lr 5e-3" in _section("The main job, measured")


def test_the_memory_terms_are_defined():
    strategies = _section("Strategies")
    assert "| the whole graph, N s L |" in strategies and "| O(L) |" in strategies
    assert re.search(r"\*\*N\*\* steps of a Runge-Kutta method with \*\*s\*\*\s+stages", strategies)
    assert re.search(r"\*\*L\*\* is what autograd keeps for one evaluation of the\s+field", strategies)
    assert re.search(r"\*\*O\(L\)\*\* means", strategies)


def _logged_figures() -> set[str]:
    """Every figure name nde_zoo logs: literal names, and ``{stage}/x`` as ``*/x``."""
    names: set[str] = set()
    for path in (REPO / "nde_zoo").rglob("*.py"):
        if "bench" in path.parts:
            continue
        text = path.read_text()
        names |= set(re.findall(r'\.log\(\s*"([a-z_]+/[a-z_]+)"', text))  # self.log("test/gmm_nll", ...)
        names |= {f"*/{n}" for n in re.findall(r'\.log\(\s*f"\{stage\}/([a-z_]+)"', text)}
        names |= set(re.findall(r'"([a-z_]+/[a-z_]+)":', text))  # dicts handed to log_dict / log
        names |= set(re.findall(r'figures\["([a-z_]+/[a-z_]+)"\]', text))
    return names


def test_the_glossary_names_every_logged_figure_and_picture():
    glossary = _section("What is logged, and what the pictures show")
    figures = _logged_figures()
    assert {"*/loss", "*/nfe", "nfe/forward", "memory/saved_bytes", "time/step_s"} <= figures
    for name in sorted(figures):
        shown = name in glossary or name.replace("*/", "val/") in glossary
        assert shown, f"{name} is logged but not in the README's glossary"
    pictures = set()
    for path in (REPO / "nde_zoo" / "models").glob("*.py"):
        pictures |= set(re.findall(r'"([a-z_]+\.png)"', path.read_text()))
    assert {"nfe_curve.png", "cnf_samples.png", "sde_paths.png"} <= pictures
    for picture in sorted(pictures):
        assert f"`{picture}`" in glossary, f"{picture} is written but not in the README's glossary"


def test_gpu_guidance_and_where_sweeps_write():
    gpus = _section("GPUs")
    for needle in ("CUDA", "trainer.accelerator", "trainer=ddp", "memory/cuda_peak_bytes", "bf16-mixed"):
        assert needle in gpus, needle
    use = _section("Use")
    assert "multirun/<subcommand>/<time>/<job number>/" in use
    sweeps = _section("Sweeps: one table of every job")
    assert "`sweep.csv` and `sweep.md`" in sweeps and "python -m nde_zoo table FOLDER" in sweeps
    assert re.search(r"^\| job \| strategy \| status \|", sweeps, flags=re.M)  # a table a sweep wrote


def test_extending_says_where_a_wheel_user_finds_the_examples():
    text = (REPO / "docs" / "extending.md").read_text()
    assert "examples_dir()" in text and "python examples/extending/new_model.py" in text
