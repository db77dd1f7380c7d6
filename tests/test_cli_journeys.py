"""A new user's command-line journeys: no progress bar, TensorBoard,
each log line once, pictures in the run directory, benchmark names a user understands."""

from __future__ import annotations

import re

from nde_zoo.bench.runner import main as bench_main


def test_quiet_fit_with_tensorboard_logs_once_and_puts_pictures_in_the_run_dir(cli, tmp_path):
    run = tmp_path / "run"
    out = cli("fit", "trainer.enable_progress_bar=false", "logger=tensorboard", "strategy.solver=rk4",
              "strategy.steps=2", "model.state_dim=4", "model.width=8", "trainer.max_steps=2",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0",
              f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(run.glob("tensorboard/version_*/events.out.tfevents.*")), sorted(run.rglob("*"))
    text = out.stdout + out.stderr
    # fixed steps: the NFE never varied, so no picture of it (pictures in the run dir: tests/test_cnf.py)
    assert not (run / "nfe_curve.png").exists() and text.count("nfe_curve.png not drawn") == 1, text[-3000:]
    assert text.count("Seed set to 0") == 1, text[:3000]
    assert len(re.findall(r"model ODEClassifier with gradient strategy", text)) == 1, text[:3000]
    assert "Epoch 0" not in text  # no progress bar


def test_bench_list_shows_names_and_papers_not_internal_labels(capsys):
    bench_main(["--list"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 8
    for line in lines:
        assert not re.search(r"\bseed \d{3}\b", line), line
    assert any("McCallum & Foster" in line for line in lines)
