"""Bad input gets a clear error naming what was wrong and how to fix it; nothing is lost.

Other kinds are tested where they live (test_solvers: shapes, dtypes, devices, ts, NaN state,
underflow, max_steps, stepping; test_reversible: precision, coupling; test_datamodules:
malformed IDX files; test_cli: unknown names, missing/nonexistent ckpt_path; test_matrix:
unsupported pairs; test_ernode: bad wrapper arguments). These are the ones that cross layers.
"""

from __future__ import annotations

import hashlib

import lightning
import numpy as np
import pytest
import torch

from nde_zoo.datamodules.tabular import ArrayDataModule
from nde_zoo.models import CNF, ODEClassifier
from nde_zoo.solvers import NonFiniteStateError
from nde_zoo.strategies import Direct

from .test_cli import FAST


def test_corrupt_checkpoint_is_named(cli, tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    out = cli("test", f"ckpt_path={bad}", cwd=tmp_path)
    assert out.returncode != 0 and "is not a readable checkpoint" in out.stderr
    assert "Traceback" not in out.stderr


def test_foreign_file_is_not_a_lightning_checkpoint(cli, tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    out = cli("validate", f"ckpt_path={foreign}", cwd=tmp_path)
    assert out.returncode != 0 and "is not a Lightning checkpoint (it has no state_dict)" in out.stderr


def test_resuming_never_overwrites_the_source_checkpoint(cli, tmp_path):
    out = cli("fit", *FAST, "test_after_fit=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    source = next(tmp_path.glob("outputs/fit/ode_classifier/*/checkpoints/last.ckpt"))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = cli("fit", *FAST, "trainer.max_epochs=2", "test_after_fit=false", f"ckpt_path={source}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    assert len(list(tmp_path.glob("outputs/fit/ode_classifier/*/checkpoints/last.ckpt"))) == 2


class _Empty(ArrayDataModule):
    def __init__(self):
        super().__init__(8, 0.1, 0.1, 0, True)

    def load_arrays(self):
        return np.zeros((0, 64)), np.zeros((0,))


def test_empty_dataset():
    with pytest.raises(ValueError, match="_Empty loaded an empty dataset"):
        _Empty().setup()


def test_nan_in_the_data_is_reported_with_the_time():
    model = ODEClassifier(Direct("rk4", steps=4), state_dim=4, width=8)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"NaN or infinite by t=1\.0 \(it was finite at t=0\.0\)|initial state y0 is NaN or infinite at t=0\.0 in 1 of 3 batch entries \(first: index 1\)"):
        model(x)


def test_nan_in_training_data_stops_training_with_our_error(tmp_path):
    class NaNData(ArrayDataModule):
        def __init__(self):
            super().__init__(16, 0.2, 0.2, 0, False)

        def load_arrays(self):
            x = np.random.default_rng(0).standard_normal((64, 64))
            x[:, 3] = np.nan
            return x, np.zeros(64, dtype=np.int64)

    model = ODEClassifier(Direct("rk4", steps=2), state_dim=4, width=8)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteStateError, match="NaN or infinite"):
        trainer.fit(model, NaNData())


def test_a_nan_gradient_is_refused_before_it_reaches_the_weights(tmp_path):
    """A finite loss whose gradient is NaN once poisoned every weight and surfaced a step later."""
    from nde_zoo.datamodules import DigitsDataModule

    lightning.seed_everything(0)
    model = ODEClassifier(Direct("rk4", steps=2), state_dim=4, width=8)
    poisoned = model.head.weight if hasattr(model, "head") else next(model.parameters())
    poisoned.register_hook(lambda grad: grad * float("nan"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0, default_root_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient at training step 0 in 1 parameter "
                                                 r"tensor\(s\): \S*weight\. The weights were not updated"):
        trainer.fit(model, DigitsDataModule(batch_size=32))
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


@pytest.mark.parametrize("factor", [0.0, 1.5])
def test_lr_final_factor_out_of_range(factor):
    with pytest.raises(ValueError, match=rf"lr_final_factor must be in \(0, 1\], got {factor}"):
        CNF(Direct("rk4", steps=2), width=8, lr_final_factor=factor)
