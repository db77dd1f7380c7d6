"""Local ERNODE: the regulariser, its sampling, its schedule, and every inner strategy."""

from __future__ import annotations

import lightning
import pytest
import torch
from torch import nn

from nde_zoo.datamodules import DigitsDataModule
from nde_zoo.models import ODEClassifier
from nde_zoo.strategies import Direct, LocalERNODE, Reversible

F64 = torch.float64
INNERS = ["direct", "checkpoint", "adjoint", "seminorm", "reversible", "symplectic"]


class MLP(nn.Module):
    def __init__(self, dim=3, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=F64))

    def forward(self, t, y):
        return self.c.expand_as(y)


class SwitchedOff(nn.Module):
    """A field that is exactly zero after ``t = 1`` (a CDE's control held constant past a short series)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3).double()

    def forward(self, t, y):
        return self.linear(y) * (t < 1.0).to(y)


def test_a_zero_local_error_has_a_zero_gradient_not_nan():
    """sqrt'(0) is infinite: the RMS of an error estimate of exactly zero once gave NaN gradients."""
    field = SwitchedOff()
    strategy = LocalERNODE(Reversible("rk4", steps=4))
    strategy.rng.seed(0)
    ts = torch.tensor([0.0, 4.0], dtype=F64)
    while True:  # sample until the regularised time falls where the field is off
        solution = strategy.solve(field, torch.ones(2, 3, dtype=F64), ts)
        if float(solution.extras["ernode"]["t"]) > 1.0:
            break
    reg = strategy.regularisation(solution)
    assert float(reg) == 0.0
    reg.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in field.parameters())


def test_regulariser_is_non_negative_and_differentiable():
    field = MLP().double()
    strategy = LocalERNODE(Direct("dopri5", rtol=1e-4, atol=1e-6))
    for _ in range(5):
        sol = strategy.solve(field, torch.randn(8, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
        reg = strategy.regularisation(sol)
        assert reg.item() >= 0.0
    grads = torch.autograd.grad(reg, list(field.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_regulariser_vanishes_when_the_embedded_error_does():
    strategy = LocalERNODE(Direct("dopri5", rtol=1e-4, atol=1e-6))
    sol = strategy.solve(Constant(), torch.randn(4, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert strategy.regularisation(sol).abs().item() < 1e-12  # zero up to the round-off of the tableau


def test_outputs_are_the_requested_ones_and_inference_is_untouched():
    field = MLP().double()
    y0 = torch.randn(4, 3, dtype=F64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    inner = Direct("dopri5", rtol=1e-6, atol=1e-8)
    strategy = LocalERNODE(inner)
    sol = strategy.solve(field, y0, ts)
    assert sol.ys.shape == (3, 4, 3) and "ernode" in sol.extras
    with torch.no_grad():
        plain = inner.solve(field, y0, ts)
        quiet = strategy.solve(field, y0, ts)
    assert "ernode" not in quiet.extras and quiet.stats.nfe_forward == plain.stats.nfe_forward
    assert torch.equal(quiet.ys, plain.ys) and strategy.regularisation(quiet).item() == 0.0
    assert torch.allclose(sol.ys, plain.ys, atol=1e-5)


def test_sampled_time_is_reproducible_under_a_seed():
    field = MLP().double()
    y0, ts = torch.randn(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    times = [[float(LocalERNODE(Direct("rk4", steps=4), seed=s).solve(field, y0, ts).extras["ernode"]["t"])
              for _ in range(1)] for s in (3, 3, 4)]
    assert times[0] == times[1] != times[2]


def test_biased_sampling_picks_accepted_step_times():
    field = MLP().double()
    y0, ts = torch.randn(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    strategy = LocalERNODE(Direct("dopri5", rtol=1e-5, atol=1e-7), sampling="biased")
    first = strategy.solve(field, y0, ts)
    starts = first.path.times[:-1]
    for _ in range(5):
        t = float(strategy.solve(field, y0, ts).extras["ernode"]["t"])
        assert t in starts


def test_schedule_decays_exponentially():
    strategy = LocalERNODE(Direct("rk4", steps=2), coef_start=4.0, coef_end=1.0, decay_steps=10)
    values = []
    for step in (0, 5, 10, 20):
        strategy.step = step
        values.append(strategy.coef)
    assert values == pytest.approx([4.0, 2.0, 1.0, 1.0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(inner="ernode"), "cannot wrap itself"),
    (dict(inner="bogus"), "unknown inner strategy 'bogus' for ernode; valid inner strategies: adjoint, auto, checkpoint"),
    (dict(sampling="random"), "sampling must be one of unbiased, biased"),
    (dict(coef_start=1.0, coef_end=2.0), "coef_start >= coef_end > 0"),
    (dict(error_solver="rk4"), "no embedded error estimate"),
])
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalERNODE(**kwargs)


def _trainer(tmp_path, **kwargs):
    return lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             default_root_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("inner", INNERS)
def test_composes_with_every_inner_strategy(inner, tmp_path):
    lightning.seed_everything(0)
    strategy = LocalERNODE(inner)
    model = ODEClassifier(strategy, state_dim=8, width=16)
    _trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(model, DigitsDataModule(batch_size=32))
    assert strategy.step == 2 and strategy.history and strategy.history[-1]["nfe/forward"] > 0


def test_schedule_resumes_from_a_checkpoint(tmp_path):
    def fit(max_steps, ckpt=None, root=tmp_path):
        lightning.seed_everything(0)
        strategy = LocalERNODE(Reversible("rk4", steps=3), decay_steps=10, sampling="biased")
        model = ODEClassifier(strategy, state_dim=8, width=16)
        checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)
        _trainer(root, max_steps=max_steps, callbacks=[checkpoint]).fit(
            model, DigitsDataModule(batch_size=32), ckpt_path=ckpt)
        return strategy

    straight = fit(5, root=tmp_path / "a")
    fit(3, root=tmp_path / "b")
    resumed = fit(5, ckpt=str(tmp_path / "b" / "last.ckpt"), root=tmp_path / "b")
    assert resumed.step == straight.step == 5 and resumed.coef == straight.coef
    assert resumed.rng.getstate() == straight.rng.getstate()
