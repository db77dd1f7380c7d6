"""Every model trains a few steps with every strategy it supports through the real CLI.

One Hydra multirun per model (one process; one job per strategy, each with its own config:
adaptive dopri5, or for ernode its default inner) keeps this to one subprocess a model; each
job must leave its checkpoint and a CSV log with finite training losses. The unsupported
pairs are tests/test_matrix.py's.
"""

from __future__ import annotations

import csv
import math

import pytest

ODE_STRATEGIES = ["adjoint", "checkpoint", "direct", "ernode", "reversible", "seminorm", "symplectic"]
SDE_STRATEGIES = ["adjoint", "direct", "ernode", "reversible"]
COMMON = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
          "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1"]
MODELS = {  # model -> (its strategies, overrides that make a step cheap)
    "ode_classifier": (ODE_STRATEGIES, ["data.batch_size=32", "model.state_dim=8", "model.width=16"]),
    "cnf": (ODE_STRATEGIES, ["data.n_train=128", "data.n_val=32", "data.n_test=32", "data.batch_size=64",
                             "model.width=8"]),
    "latent_ode": (ODE_STRATEGIES, ["data.n_train=20", "data.n_val=10", "data.n_test=10", "data.batch_size=10",
                                    "model.hidden_dim=8"]),
    "cde": (ODE_STRATEGIES, ["data.batch_size=16", "model.hidden_dim=4", "model.width=8"]),
    "sde": (SDE_STRATEGIES, ["data.batch_size=32", "model.state_dim=8", "model.width=16"]),
    "latent_sde": (SDE_STRATEGIES, ["data.n_train=16", "data.n_val=4", "data.n_test=4", "data.batch_size=8",
                                    "model.latent_dim=2", "model.context_dim=2", "model.width=8",
                                    "model.encoder_hidden=4"]),
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_supported_strategy_trains_through_the_cli(cli, tmp_path, model):
    strategies, model_overrides = MODELS[model]
    sweep = tmp_path / "sweep"
    out = cli("fit", "-m", f"model={model}", "strategy=" + ",".join(strategies), *model_overrides, *COMMON,
              f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == len(strategies), [p.name for p in sweep.iterdir()]
    seen = set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        seen.update(s for s in strategies if f"strategy={s}\n" in overrides)
        assert (job / "checkpoints" / "last.ckpt").is_file(), job
        rows = list(csv.DictReader(next(job.glob("csv/version_*/metrics.csv")).open()))
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert losses and all(math.isfinite(v) for v in losses), (job, rows[:3])
    assert seen == set(strategies)
