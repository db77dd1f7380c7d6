"""The command line: subcommands in front of Hydra, errors that say what to do, an end-to-end fit.

Run in process (the ``cli`` fixture, tests/inprocess.py) but for the tests about the process
itself: ``python -m nde_zoo --help``, the end-to-end fit and test from its checkpoint, and DDP,
whose launcher re-executes the command line.
"""

from __future__ import annotations

import csv
import re

import pytest

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
        "strategy.solver=rk4", "strategy.steps=2", "strategy.rtol=null", "strategy.atol=null"]


def test_no_subcommand_prints_usage(cli):
    out = cli()
    assert out.returncode == 2 and "usage: nde-zoo <subcommand>" in out.stderr


@pytest.mark.spawns
def test_help_in_a_fresh_process(cli_subprocess):
    """``python -m nde_zoo`` as a user runs it: the module entry point, in an interpreter of its own."""
    out = cli_subprocess("--help")
    assert out.returncode == 0 and "usage: nde-zoo <subcommand>" in out.stdout, out.stderr


def test_unknown_subcommand(cli):
    out = cli("train")
    assert out.returncode == 2
    assert "unknown subcommand 'train'; choose one of fit, validate, test, predict, bench, gradcheck" in out.stderr


def test_cfg_job_prints_the_composed_config(cli, tmp_path):
    out = cli("predict", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "subcommand: predict" in out.stdout and "ckpt_path: ???" in out.stdout
    assert "_target_: nde_zoo.models.ODEClassifier" in out.stdout


def test_test_needs_ckpt_path(cli, tmp_path):
    out = cli("test", cwd=tmp_path)
    assert out.returncode != 0 and "test needs a checkpoint: pass ckpt_path=<file.ckpt>" in out.stderr


def test_missing_checkpoint_file(cli, tmp_path):
    out = cli("validate", "ckpt_path=nowhere.ckpt", cwd=tmp_path)
    assert out.returncode != 0 and "ckpt_path=nowhere.ckpt does not exist" in out.stderr


@pytest.mark.parametrize("override, group", [("strategy=bogus", "strategy"), ("model=bogus", "model")])
def test_unknown_config_name_lists_valid_ones(cli, tmp_path, override, group):
    out = cli("fit", override, cwd=tmp_path)
    assert out.returncode != 0
    assert f"Could not find '{group}/bogus'" in out.stderr and f"Available options in '{group}'" in out.stderr
    assert ("direct" if group == "strategy" else "ode_classifier") in out.stderr


def test_multirun_with_subprocess_ddp_is_refused(cli, tmp_path):
    out = cli("fit", "-m", "trainer=ddp", "seed=1,2", cwd=tmp_path)
    assert out.returncode != 0 and "re-launch the whole sweep in every rank" in out.stderr


@pytest.mark.spawns
def test_fit_end_to_end_then_test_from_its_checkpoint(cli_subprocess, tmp_path):
    """The one fit and test through fresh ``python -m nde_zoo`` processes, as a user runs them."""
    cli = cli_subprocess
    out = cli("fit", *FAST, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next((tmp_path / "outputs" / "fit" / "ode_classifier").iterdir())
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    metrics = next(run_dir.glob("csv/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("nfe/forward") for r in rows) and any(r.get("test/acc") for r in rows)
    assert not (run_dir / "nfe_curve.png").exists()  # fixed steps: the NFE never varied, so no picture of it
    out = cli("test", f"ckpt_path={last}", *FAST, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/acc" in out.stdout + out.stderr


def _gradcheck_errors(stdout: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\w+): ([0-9.e+-]+)$", stdout, re.M)}


@pytest.mark.parametrize("strategy, cls", [("symplectic", "Symplectic"), ("reversible", "Reversible")])
def test_gradcheck_subcommand_compares_an_exact_strategy_with_backprop(cli, tmp_path, strategy, cls):
    """Not Direct against itself: the named strategy's own backward against float64 backprop."""
    out = cli("gradcheck", f"strategy={strategy}", "strategy.solver=rk4", "strategy.steps=3",
              "strategy.rtol=null", "strategy.atol=null", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"relative gradient error of {cls}(" in out.stdout, out.stdout
    errors = _gradcheck_errors(out.stdout)
    assert {"field", "all"} <= set(errors), out.stdout
    assert all(e <= 1e-10 for e in errors.values()), errors  # exact: round-off in float64


def test_gradcheck_subcommand_shows_an_approximate_gradient(cli, tmp_path):
    """The same command on the continuous adjoint prints an error far above round-off: it can fail."""
    out = cli("gradcheck", "strategy=adjoint", "strategy.solver=midpoint", "strategy.steps=3",
              "strategy.rtol=null", "strategy.atol=null", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "relative gradient error of Adjoint(" in out.stdout, out.stdout
    assert _gradcheck_errors(out.stdout)["all"] > 1e-6


def test_bench_lists_and_rejects_unknown(cli):
    out = cli("bench", "--list")
    assert out.returncode == 0 and "solver_overhead" in out.stdout
    out = cli("bench", "nope")
    assert out.returncode == 2 and "unknown benchmark 'nope'; valid benchmarks:" in out.stderr


@pytest.mark.xdist_group("bench_quick:solver_overhead")  # beside test_bench_quick.py's, which share its run
def test_bench_quick_writes_its_outputs(bench_quick):
    """The quick run test_bench_quick.py checks (the session's, not another): its files in --out."""
    _, markdown = bench_quick("solver_overhead")  # asserts its exit status is 0
    out = bench_quick.out["solver_overhead"]
    assert (out / "solver_overhead.json").is_file() and (out / "solver_overhead.md").is_file()
    assert "ratio" in (out / "solver_overhead.md").read_text() and "ratio" in markdown


@pytest.mark.ddp
@pytest.mark.spawns
def test_ddp_through_the_cli_in_subprocesses(cli_subprocess, tmp_path):
    """Lightning re-launches rank 1 with the restored argv: both ranks train in one run dir.

    Safe inside a pytest session: the re-launched command is the CLI's, not pytest's.
    """
    out = cli_subprocess("fit", "trainer=ddp", "trainer.accelerator=cpu", *FAST, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "fit" / "ode_classifier").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()
    assert "GLOBAL_RANK: 1" in out.stderr + out.stdout


@pytest.mark.parametrize("inner", ["direct", "checkpoint", "adjoint", "seminorm", "reversible", "symplectic"])
def test_ernode_wraps_an_inner_strategy_from_the_cli(cli, tmp_path, inner):
    out = cli("fit", "strategy=ernode", f"strategy.inner={inner}", "trainer.max_steps=2",
              "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
              "test_after_fit=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = next((tmp_path / "outputs").glob("fit/ode_classifier/*/csv/version_*/metrics.csv")).read_text()
    assert "reg/value" in metrics and "reg/coef" in metrics and "nfe/forward" in metrics
