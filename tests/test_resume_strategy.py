"""Resuming a fit with another gradient strategy than its checkpoint's is never silent.

It used to be: a run resumed without ``strategy=`` became Direct (the config's default), dropping an
ERNODE run's regulariser state, and its new checkpoint said Direct; one resumed with
``strategy=symplectic`` carried on without a word. Now a warning names both strategies; without a
``strategy`` override the checkpoint's is kept, and an explicit one changes it, naming what is dropped.
"""

from __future__ import annotations

import shutil

import torch
import yaml

from tests.test_run_directories import TINY, UNVERSIONED, nde_zoo_in_process

ERNODE = "LocalERNODE(inner=Direct(solver='rk4', steps=2)"


def _strategy_state(checkpoint: dict) -> dict:
    return {k: v for k, v in checkpoint["callbacks"].items() if k.startswith("GradientStrategy[")}


def test_a_resume_without_strategy_keeps_the_checkpoints(tmp_path, monkeypatch):
    run = tmp_path / "resumed"
    nde_zoo_in_process(
        "fit", *TINY, f"ckpt_path={UNVERSIONED}", f"hydra.run.dir={run}", monkeypatch=monkeypatch
    )
    log = (run / "cli.log").read_text()
    assert f"was trained with gradient strategy {ERNODE}" in log, log
    assert "and the config's is Direct(solver='dopri5'" in log and "resuming with the checkpoint's" in log
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["hyper_parameters"]["strategy"]["_target_"].endswith("LocalERNODE")
    state = _strategy_state(saved)
    assert list(state) == ["GradientStrategy[LocalERNODE]"]
    assert state["GradientStrategy[LocalERNODE]"]["step"] == 4  # 2 saved + 2 steps trained: not restarted
    assert "strategy=ernode" in saved["nde_zoo"]["overrides"]  # `test ckpt_path=` rebuilds ERNODE
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["strategy"]["_target_"].endswith("LocalERNODE")  # the run's recorded config says so too


def test_an_explicit_strategy_changes_it_and_names_what_is_dropped(tmp_path, monkeypatch):
    run = tmp_path / "symplectic"
    nde_zoo_in_process(
        "fit",
        *TINY,
        f"ckpt_path={UNVERSIONED}",
        "strategy=symplectic",
        "strategy.solver=rk4",
        "strategy.steps=2",
        f"hydra.run.dir={run}",
        monkeypatch=monkeypatch,
    )
    log = (run / "cli.log").read_text()
    assert (
        f"with gradient strategy Symplectic(solver='rk4', steps=2) instead of the checkpoint's {ERNODE}"
        in log
    ), log
    assert "given: strategy=symplectic strategy.solver=rk4 strategy.steps=2" in log
    assert (
        "dropped: ERNODE's regulariser state (its coefficient schedule at training step 2, its sampling RNG "
        "and 3 previous solve times)"
    ) in log
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["hyper_parameters"]["strategy"]["_target_"].endswith("Symplectic")

    again = tmp_path / "direct"  # a strategy that saved no state, changed explicitly: said as well
    last = tmp_path / "symplectic.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", last)
    nde_zoo_in_process(
        "fit",
        *TINY,
        "trainer.max_epochs=3",
        f"ckpt_path={last}",
        "strategy=direct",
        "strategy.solver=rk4",
        "strategy.steps=2",
        f"hydra.run.dir={again}",
        monkeypatch=monkeypatch,
    )
    log = (again / "cli.log").read_text()
    assert (
        "with gradient strategy Direct(solver='rk4', steps=2) instead of the checkpoint's "
        "Symplectic(solver='rk4', steps=2) (given: strategy=direct"
    ) in log, log
    assert "it saved no state, so none is dropped" in log


def test_the_same_strategy_resumes_without_a_warning(tmp_path, monkeypatch):
    run = tmp_path / "same"
    nde_zoo_in_process(
        "fit",
        *TINY,
        f"ckpt_path={UNVERSIONED}",
        "strategy=ernode",
        "strategy.inner.solver=rk4",
        "strategy.inner.steps=2",
        f"hydra.run.dir={run}",
        monkeypatch=monkeypatch,
    )
    log = (run / "cli.log").read_text()
    assert "gradient strategy" in log and "instead of" not in log and "was trained with" not in log


def test_what_is_dropped_is_named_per_strategy():
    from nde_zoo.train import _describe_state

    auto = {"plans": {"k1": {"choice": "checkpoint", "rows": []}, "k2": {"choice": "direct"}}, "latest": "k1"}
    assert _describe_state("Auto", auto) == "Auto's plan (2 planned solve(s), chosen: checkpoint, direct)"
    ernode = {"step": 7, "rng": (3, (), None), "previous_times": [0.0, 0.5], "inner": auto}
    assert _describe_state("LocalERNODE", ernode) == (
        "ERNODE's regulariser state (its coefficient schedule at training step 7, its sampling RNG and 2 "
        "previous solve times; and its inner strategy's: Auto's plan (2 planned solve(s), chosen: "
        "checkpoint, direct))"
    )
    assert _describe_state("Custom", {"counter": 3}) == "Custom's state (counter)"
