"""The downstream example trains from the CLI with its own config on nde_zoo's search path."""

from __future__ import annotations

import os
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "downstream"


def test_downstream_subclass_trains_from_the_cli(cli, tmp_path):
    out = cli("fit", "model=gated_classifier", "strategy=symplectic", "strategy.solver=rk4", "strategy.steps=2",
              "strategy.rtol=null", "strategy.atol=null", "trainer.max_steps=3", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0",
              f"hydra.searchpath=[file://{EXAMPLE / 'configs'}]", "hydra.run.dir=" + str(tmp_path / "run"),
              cwd=EXAMPLE, env={"PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GatedClassifier" in out.stdout + out.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
