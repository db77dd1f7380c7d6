"""``validate`` and ``predict`` succeed from a checkpoint that ``fit`` wrote, for every model, through
the real CLI: the metrics they print and the predictions they save are the model's own.

The model's name and size overrides are passed again explicitly, so this holds whether or not
the checkpoint describes its own run.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from tests.test_cli_strategies import MODELS

FIT = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
       "trainer.log_every_n_steps=1", "test_after_fit=false"]
#: model -> the metric its validation step logs
VAL_METRIC = {"ode_classifier": "val/acc", "cde": "val/acc", "sde": "val/acc", "cnf": "val/loss",
              "latent_ode": "val/loss", "latent_sde": "val/loss"}


def _logged(text: str, metric: str) -> float:
    """The value Lightning's results table printed for ``metric``."""
    match = re.search(rf"{re.escape(metric)}\s*│?\s*([-+0-9.eE]+|nan)", text)
    assert match, f"{metric} not printed:\n{text[-3000:]}"
    return float(match.group(1))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_validate_and_predict_from_a_fit_checkpoint(cli, tmp_path, model):
    assert set(VAL_METRIC) == set(MODELS)
    _, overrides = MODELS[model]
    args = [f"model={model}", "strategy=direct", *overrides]
    out = cli("fit", *args, *FIT, f"hydra.run.dir={tmp_path / 'fit'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    out = cli("validate", f"ckpt_path={ckpt}", *args, "trainer.limit_val_batches=2",
              f"hydra.run.dir={tmp_path / 'validate'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    value = _logged(out.stdout + out.stderr, VAL_METRIC[model])
    assert math.isfinite(value)

    out = cli("predict", f"ckpt_path={ckpt}", *args, "++trainer.limit_predict_batches=2",
              f"hydra.run.dir={tmp_path / 'predict'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    predictions = torch.load(tmp_path / "predict" / "predictions.pt", weights_only=False)
    assert isinstance(predictions, list) and 1 <= len(predictions) <= 2, type(predictions)  # limit: 2 batches
    for batch in predictions:
        parts = batch.values() if isinstance(batch, dict) else batch
        tensors = [batch] if torch.is_tensor(batch) else list(parts)
        assert tensors and all(torch.is_tensor(t) for t in tensors), type(batch)
        assert all(t.shape[0] > 0 and (not t.is_floating_point() or torch.isfinite(t).all()) for t in tensors)
