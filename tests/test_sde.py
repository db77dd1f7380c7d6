"""Neural SDEs: strategy routes onto torchsde (reversible Heun exact in float64), seeded per-rank noise,
the SDE models train with every SDE strategy and refuse the others by name, the local error estimate."""

from __future__ import annotations

from types import SimpleNamespace

import lightning
import pytest
import torch
import torchsde
from torch import nn

from nde_zoo.datamodules import DigitsDataModule, SDESeriesDataModule
from nde_zoo.models import LatentSDE, SDEClassifier
from nde_zoo.models.base import strategies_supporting
from nde_zoo.strategies import Adjoint, Checkpoint, Direct, LocalERNODE, Reversible, Seminorm, Symplectic
from nde_zoo.strategies.sde import brownian, sde_local_error, sde_method


class ToySDE(nn.Module):
    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, dim=3, noise=0.3):
        super().__init__()
        self.a, self.b, self.noise = nn.Linear(dim + 1, dim), nn.Linear(dim, dim), noise

    def f(self, t, y):
        return torch.tanh(self.a(torch.cat([y, t.to(y).expand(len(y), 1)], -1)))

    def g(self, t, y):
        return self.noise * torch.sigmoid(self.b(y))


def _setup(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    sde = ToySDE().to(dtype)
    y0 = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    return sde, y0


def _grads(sde, y0, ys):
    loss = sum((ys[i] * (i + 1)).pow(2).sum() for i in range(len(ys)))  # every output time matters
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [y0, *sde.parameters()])])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# -- routes ---------------------------------------------------------------------------------
def test_reversible_equals_backprop_through_reversible_heun_on_the_same_brownian_sample():
    sde, y0 = _setup()
    ts = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    reference = _grads(
        sde,
        y0,
        torchsde.sdeint(sde, y0, ts, bm=brownian(0.0, 1.0, y0, 7), method="reversible_heun", dt=1 / 32),
    )
    solution = Reversible(steps=32).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 7))
    assert solution.extras["sde"] == {"method": "reversible_heun", "dt": 1 / 32, "route": "reversible"}
    assert _rel(_grads(sde, y0, solution.ys), reference) < 1e-8
    # the model's dt is used when the strategy is adaptive (as the default configs are)
    adaptive = Reversible(rtol=1e-3, atol=1e-6).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 7), dt=1 / 32)
    assert _rel(_grads(sde, y0, adaptive.ys), reference) < 1e-8
    assert solution.stats.accepted_steps == 32 and 32 < solution.stats.nfe_forward <= 34  # one drift per step


def test_reversible_memory_does_not_grow_with_steps():
    sde, y0 = _setup()
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    saved = {
        n: Reversible(steps=n).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 1)).saved_bytes
        for n in (16, 128)
    }
    direct = {
        n: Direct("midpoint", steps=n).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 1)).saved_bytes
        for n in (16, 128)
    }
    assert saved[128] == saved[16] and direct[128] > 4 * direct[16]


def test_direct_is_sdeint_and_adjoint_approximates_it():
    sde, y0 = _setup()
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    reference = _grads(
        sde, y0, torchsde.sdeint(sde, y0, ts, bm=brownian(0.0, 1.0, y0, 3), method="midpoint", dt=1 / 64)
    )
    direct = Direct("midpoint", steps=64).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 3))
    assert _rel(_grads(sde, y0, direct.ys), reference) < 1e-12
    adjoint = Adjoint("midpoint", steps=64).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 3))
    assert _rel(_grads(sde, y0, adjoint.ys), reference) < 2e-2  # the continuous adjoint: close, not exact
    assert adjoint.stats.nfe_backward > 0 and adjoint.saved_bytes < direct.saved_bytes


def test_method_follows_the_solver():
    assert (sde_method("euler"), sde_method("heun"), sde_method("midpoint"), sde_method("dopri5")) == (
        "euler_heun",
        "heun",
        "midpoint",
        "midpoint",
    )


def test_sde_errors_are_explained():
    sde, y0 = _setup()
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"output time 0\.5 at 0\.5499.* power-of-two fraction"):
        Reversible(steps=20).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 1))
    with pytest.raises(ValueError, match=r"adaptive \(rtol/atol\), which SDE solves do not use"):
        Direct().solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 1))

    class WrongShape(ToySDE):
        def g(self, t, y):
            return torch.ones(len(y), 5, dtype=y.dtype)

    with pytest.raises(
        ValueError,
        match=r"WrongShape\.g \(the diagonal diffusion .*\) returned shape \(4, 5\).*"
        r"meaning batch 4, state 3",
    ):
        Direct("midpoint", steps=4).solve_sde(WrongShape().double(), y0, ts, brownian(0.0, 1.0, y0, 1))

    class Ito(ToySDE):
        sde_type = "ito"

    with pytest.raises(ValueError, match="sde_type='stratonovich'"):
        Direct("midpoint", steps=4).solve_sde(Ito().double(), y0, ts, brownian(0.0, 1.0, y0, 1))


def test_hidden_input_is_refused_by_the_adjoint_routes():
    sde, y0 = _setup()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    class Closing(ToySDE):
        def f(self, t, y):
            return super().f(t, y) * scale

    closing = Closing().double()
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for strategy in (Adjoint("midpoint", steps=8), Reversible(steps=8)):
        with pytest.raises(RuntimeError, match="neither the state nor one of the field's parameters"):
            strategy.solve_sde(closing, y0, ts, brownian(0.0, 1.0, y0, 1))
    Direct("midpoint", steps=8).solve_sde(closing, y0, ts, brownian(0.0, 1.0, y0, 1))  # backprop sees it


def test_local_error_is_a_step_doubling_estimate():
    sde, y0 = _setup()
    t = torch.tensor(0.2, dtype=torch.float64)
    bm = brownian(0.0, 1.0, y0, 5)
    errors = [
        float(sde_local_error(sde, t, y0, h, bm, rtol=1e-3, atol=1e-6).detach()) for h in (0.2, 0.05, 0.0125)
    ]
    assert errors[0] > errors[1] > errors[2] > 0
    quiet = ToySDE(noise=0.0).double()
    quiet.load_state_dict(sde.state_dict())
    noiseless = [float(sde_local_error(quiet, t, y0, h, bm, 1e-3, 1e-6).detach()) for h in (0.1, 0.05)]
    assert 5.0 < noiseless[0] / noiseless[1] < 11.0  # an ODE: midpoint's local error is O(h^3)
    value = sde_local_error(sde, t, y0, 0.1, bm, 1e-3, 1e-6)
    assert value.requires_grad and all(
        g is not None for g in torch.autograd.grad(value, list(sde.parameters()))
    )


def test_ernode_regularises_an_sde_step_on_the_grid():
    sde, y0 = _setup()
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    ernode = LocalERNODE(Reversible(steps=16), seed=3)
    assert "sde" in ernode.kinds and "sde" not in LocalERNODE(Seminorm()).kinds
    plain = Reversible(steps=16).solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 2))
    solution = ernode.solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 2))
    assert torch.allclose(solution.ys, plain.ys, rtol=0, atol=1e-13)  # the sampled time leaves the solve alone
    sample = solution.extras["ernode_sde"]
    assert sample["h"] == 1 / 16 and float(sample["t"]) * 16 == round(float(sample["t"]) * 16)
    value = ernode.regularisation(solution)
    expected = ernode.coef * sde_local_error(sde, sample["t"], sample["y"], 1 / 16, sample["bm"], 1e-3, 1e-6) / 16
    assert torch.allclose(value, expected) and value > 0
    grads = torch.autograd.grad(value + solution.ys.sum(), list(sde.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():  # inference samples nothing
        assert "ernode_sde" not in ernode.solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 2)).extras


# -- noise ----------------------------------------------------------------------------------
def test_noise_is_seeded_per_rank_stage_and_batch():
    model = SDEClassifier(Direct("midpoint", steps=4))
    model._trainer = SimpleNamespace(global_rank=0, current_epoch=3)
    model._set_noise_key("train", 5)
    first = model.noise_entropy()
    assert model.noise_entropy() != first  # a second solve in the same step draws anew
    model._set_noise_key("train", 5)
    assert model.noise_entropy() == first  # replayable (resume)
    model._trainer = SimpleNamespace(global_rank=1, current_epoch=3)
    model._set_noise_key("train", 5)
    assert model.noise_entropy() != first  # DDP: each rank its own noise
    model._set_noise_key("val", 5)
    model._trainer = SimpleNamespace(global_rank=0, current_epoch=3)
    model._set_noise_key("val", 5)
    assert model.noise_entropy() != first


def test_training_is_reproducible_and_noise_matters():
    def run(noise_seed):
        lightning.seed_everything(0)
        model = SDEClassifier(Reversible(steps=8), state_dim=8, width=16, noise_seed=noise_seed)
        _trainer(max_steps=3).fit(model, DigitsDataModule(batch_size=32))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- models ---------------------------------------------------------------------------------
def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    return lightning.Trainer(**{**defaults, **kwargs})


SDE_STRATEGIES = {
    "direct": lambda: Direct(),  # adaptive config: the model's dt is used
    "adjoint": lambda: Adjoint("midpoint", steps=8),
    "reversible": lambda: Reversible(),
    "ernode": lambda: LocalERNODE(Direct()),
}
MODELS = {
    "sde": (lambda s: SDEClassifier(s, state_dim=8, width=16), lambda: DigitsDataModule(batch_size=64)),
    "latent_sde": (
        lambda s: LatentSDE(s, latent_dim=2, context_dim=2, width=16, encoder_hidden=8),
        lambda: SDESeriesDataModule(n_train=64, n_val=16, n_test=16, n_times=9, batch_size=32),
    ),
}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("strategy", sorted(SDE_STRATEGIES))
def test_models_train_with_every_sde_strategy(model, strategy):
    lightning.seed_everything(0)
    make_model, make_data = MODELS[model]
    net = make_model(SDE_STRATEGIES[strategy]())
    before = [p.detach().clone() for p in net.parameters()]
    trainer = _trainer(max_steps=2)
    trainer.fit(net, make_data())
    assert trainer.global_step == 2
    after = list(net.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(
        not torch.equal(a, b) for a, b in zip(after, before, strict=True)
    )
    assert net.strategy.history[-1]["nfe/forward"] > 0


@pytest.mark.parametrize("strategy", [Checkpoint(), Symplectic(), Seminorm()])
@pytest.mark.parametrize("model", [SDEClassifier, LatentSDE])
def test_strategies_without_an_sde_form_are_refused_by_name(model, strategy):
    supported = strategies_supporting("sde")
    assert {"adjoint", "direct", "reversible"} <= set(supported) and strategy.name not in supported
    with pytest.raises(
        ValueError,
        match=rf"'{strategy.name}' does not support SDEs, which model "
        rf"'{model.config_name}' solves; strategies that do: .*adjoint.*direct.*"
        rf"reversible",
    ):
        model(strategy)


def test_sde_classifier_learns_digits():
    lightning.seed_everything(0)
    model = SDEClassifier(Reversible(), lr=1e-2)
    trainer = _trainer(max_epochs=2, limit_val_batches=None)
    trainer.fit(model, DigitsDataModule())
    assert trainer.test(model, DigitsDataModule(), verbose=False)[0]["test/acc"] > 0.85


def test_latent_sde_fits_the_oscillator():
    lightning.seed_everything(0)
    data = SDESeriesDataModule(n_train=256, n_val=32, n_test=64, n_times=17, batch_size=64)
    model = LatentSDE(Reversible(), latent_dim=4, context_dim=4, width=32, encoder_hidden=16)
    trainer = _trainer(max_epochs=1, limit_val_batches=None)
    first = trainer.test(model, data, verbose=False)[0]["test/mse"]
    trainer = _trainer(max_epochs=8)
    trainer.fit(model, data)
    assert trainer.test(model, data, verbose=False)[0]["test/mse"] < 0.6 * first
    with pytest.raises(ValueError, match=r"expects t \(batch, T\) and x \(batch, T, 1\)"):
        model.elbo_terms(torch.zeros(2, 5), torch.zeros(2, 5, 2))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, strategy", [("sde", "reversible"), ("latent_sde", "adjoint")])
def test_cli_fit(cli, tmp_path, model, strategy):
    result = cli(
        "fit",
        f"model={model}",
        f"strategy={strategy}",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("test/acc" if model == "sde" else "test/mse") in result.stdout + result.stderr
