"""The ODE classifier trains, checks its input, and refuses unsupported strategies."""

from __future__ import annotations

import lightning
import pytest
import torch

from nde_zoo.datamodules import DigitsDataModule
from nde_zoo.models import ODEClassifier
from nde_zoo.models.base import strategies_supporting
from nde_zoo.strategies import Direct, GradientStrategy


def _trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return lightning.Trainer(**{**defaults, **kwargs})


def test_trains_and_lowers_the_loss():
    lightning.seed_everything(0)
    dm = DigitsDataModule(batch_size=128)
    model = ODEClassifier(Direct(solver="rk4", steps=4), state_dim=16, width=32, lr=1e-2)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    before = torch.nn.functional.cross_entropy(model(x), y).item()
    _trainer(max_epochs=3).fit(model, dm)
    after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert after < 0.6 * before
    assert model.strategy.history and model.strategy.history[-1]["nfe/forward"] == 16.0
    assert model.strategy.history[-1]["memory/saved_bytes"] > 0


def test_logs_nfe_and_accuracy_in_test():
    lightning.seed_everything(0)
    model = ODEClassifier(Direct(rtol=1e-3, atol=1e-6), state_dim=8, width=16)
    results = _trainer(limit_test_batches=2).test(model, DigitsDataModule(), verbose=False)[0]
    assert set(results) >= {"test/acc", "test/loss", "test/nfe"} and results["test/nfe"] > 0


def test_input_width_mismatch_is_explained():
    model = ODEClassifier(Direct(solver="rk4", steps=2), in_features=784)
    with pytest.raises(ValueError, match=r"data gives 64 features .* model.in_features=784; pass model.in_features=64"):
        _trainer(max_steps=1).fit(model, DigitsDataModule())
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 784\), got \(2, 64\)"):
        model(torch.zeros(2, 64))


class _SDEOnly(GradientStrategy):
    kinds = frozenset({"sde"})
    name = "test_sde_only"

    def solve(self, field, y0, ts):  # pragma: no cover - never reached
        raise AssertionError


def test_unsupported_strategy_names_the_ones_that_work():
    assert "direct" in strategies_supporting("ode")
    with pytest.raises(ValueError, match=r"'test_sde_only' does not support ODEs.*strategies that do: .*direct"):
        ODEClassifier(_SDEOnly())
    with pytest.raises(TypeError, match="needs a GradientStrategy"):
        ODEClassifier("direct")


def test_strategy_is_registered_as_a_callback():
    strategy = Direct(solver="euler", steps=2)
    model = ODEClassifier(strategy)
    assert model.configure_callbacks() == [strategy]
