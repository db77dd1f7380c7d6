"""A new model family on top of ``NeuralDE`` (docs/extending.md, "A new model family").

``ODERegressor``: input -> linear embedding -> ODE block (any strategy, any field) -> linear
readout, trained with the mean squared error on :class:`SineDataModule`. It inherits the
strategy plumbing, the optimiser and its cosine schedule, the finite-gradient guard,
self-describing checkpoints and mixed precision from ``NeuralDE``.
Run: ``python examples/extending/new_model.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from new_datamodule import SineDataModule  # noqa: E402

from nde_zoo.models.base import NeuralDE  # noqa: E402
from nde_zoo.models.ode_classifier import MLPField  # noqa: E402
from nde_zoo.strategies import GradientStrategy, Reversible  # noqa: E402


class ODERegressor(NeuralDE):
    """Regress a target from a feature vector through an ODE block.

    Args:
        strategy: the gradient strategy of the ODE block (an object or a config).
        in_features / out_features: input and target sizes.
        state_dim / width: the ODE state and the default field's hidden width.
        field: your own field ``f(t, z)`` on ``(batch, state_dim)``; None builds ``MLPField``.
        lr / weight_decay / lr_final_factor: AdamW and its cosine decay (``NeuralDE``).
    """

    config_name = "ode_regressor"  # what error messages and checkpoints call it

    def __init__(self, strategy: GradientStrategy, in_features: int = 16, out_features: int = 1,
                 state_dim: int = 8, width: int = 32, field: nn.Module | dict | None = None,
                 lr: float = 1e-2, weight_decay: float = 0.0, lr_final_factor: float = 1.0) -> None:
        super().__init__(strategy, lr=lr, weight_decay=weight_decay, lr_final_factor=lr_final_factor)
        self.embed = nn.Linear(in_features, state_dim)
        self.field = self.build_field(field, lambda: MLPField(state_dim, width))  # default only if none given
        self.readout = nn.Linear(state_dim, out_features)
        self.register_buffer("ts", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(batch, in_features)`` -> prediction ``(batch, out_features)``."""
        solution = self.solve(self.field, self.embed(x), self.ts.to(x))  # the strategy's own gradient
        return self.readout(solution.ys[-1])

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        z0 = self.embed(x)
        solution = self.solve(self.field, z0, self.ts.to(x))
        loss = nn.functional.mse_loss(self.readout(solution.ys[-1]), y)
        if stage == "train":  # e.g. LocalERNODE's regulariser; zero for the others
            loss = loss + self.strategy.regularisation(solution)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(x))
        return loss


def main(max_steps: int = 30, tmp: str | None = None) -> float:
    lightning.seed_everything(0)
    model = ODERegressor(Reversible("rk4", steps=4), lr=2e-2)
    data = SineDataModule(n_train=256, n_val=32, n_test=64, batch_size=32)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=max_steps, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                num_sanity_val_steps=0, default_root_dir=tmp or ".")
    before = trainer.test(model, data, verbose=False)[0]["test/loss"]
    trainer.fit(model, data)
    after = trainer.test(model, data, verbose=False)[0]["test/loss"]
    path = Path(tmp or ".") / "ode_regressor.ckpt"
    trainer.save_checkpoint(path)
    loaded = ODERegressor.load_from_checkpoint(path)  # no arguments: the checkpoint describes itself
    assert repr(loaded.strategy) == repr(model.strategy)
    print(f"ODERegressor with {model.strategy!r}: test MSE {before:.4f} -> {after:.4f}")
    return after / before


if __name__ == "__main__":
    main(max_steps=300)
