"""DDP on the CPU (gloo, 2 processes, ddp_spawn in-process): every strategy's gradients
are all-reduced, so both ranks hold the same gradient, although each saw different data.

A strategy with its own backward must take the field's parameters as explicit inputs of
its autograd Function (ECOSYSTEM.md 3.2); one that wrote ``p.grad`` by hand would leave the
ranks disagreeing here, silently.
"""

from __future__ import annotations

import json

import lightning
import pytest
import torch

import nde_zoo.strategies as strategies
from nde_zoo.datamodules import DigitsDataModule
from nde_zoo.models import ODEClassifier

pytestmark = pytest.mark.ddp

# One small configuration per strategy: (class name, constructor kwargs).
CASES = {
    "direct": ("Direct", dict(solver="rk4", steps=3)),
    "checkpoint": ("Checkpoint", dict(solver="rk4", steps=4, snapshots=2)),
    "adjoint": ("Adjoint", dict(solver="dopri5", rtol=1e-4, atol=1e-6)),
    "seminorm": ("Seminorm", dict(solver="dopri5", rtol=1e-4, atol=1e-6)),
    "reversible": ("Reversible", dict(solver="midpoint", steps=4)),
    "symplectic": ("Symplectic", dict(solver="dopri5", rtol=1e-4, atol=1e-6)),
    "ernode": ("LocalERNODE", dict(inner="reversible")),
}


class GradientProbe(lightning.Callback):
    """Before the first optimiser step, gather every rank's flat gradient and save them."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters() if p.grad is not None])
        gathered = pl_module.all_gather(flat)  # (world_size, n_params)
        if trainer.global_rank == 0:
            with open(self.path, "w") as fh:
                json.dump(gathered.tolist(), fh)


def make_strategy(name: str):
    cls_name, kwargs = CASES[name]
    return getattr(strategies, cls_name)(**kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ranks_agree_under_ddp_spawn(name, tmp_path):
    if not hasattr(strategies, CASES[name][0]):
        pytest.fail(f"strategy {CASES[name][0]} is not exported by nde_zoo.strategies")
    lightning.seed_everything(0)
    model = ODEClassifier(make_strategy(name), state_dim=8, width=16)
    path = tmp_path / "grads.json"
    trainer = lightning.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[GradientProbe(str(path))],
    )
    trainer.fit(model, DigitsDataModule(batch_size=16))
    grads = torch.tensor(json.loads(path.read_text()), dtype=torch.float64)
    assert grads.shape[0] == 2
    assert grads.abs().max() > 0
    disagreement = (grads[0] - grads[1]).abs().max().item()
    assert disagreement == 0.0, f"{name}: ranks disagree by {disagreement:.3g}"
