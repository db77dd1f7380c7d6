"""Your own vector field and mixed precision.

Every model takes its field as an argument (a module, or a config with ``_target_``) and builds
the default only when none is given; a field conditioned on context the wrong way gets an error
pointing to docs/extending.md, the right way (through the state) trains under reversible. Under
``bf16-mixed`` every model keeps the DE state float32, so reversible works on every model.
"""

from __future__ import annotations

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from nde_zoo.configs_path import config_dir
from nde_zoo.models import CNF, LatentODE, LatentSDE, NeuralCDE, ODEClassifier, SDEClassifier
from nde_zoo.models.cde import CDEFunc
from nde_zoo.models.cnf import ConcatSquashVelocity
from nde_zoo.models.latent_ode import LatentField
from nde_zoo.models.ode_classifier import MLPField
from nde_zoo.models.sde import ClassifierSDE, LatentPosteriorSDE
from nde_zoo.strategies import Direct, Reversible, Symplectic
from nde_zoo.train import build

# model class, small arguments, (its default field class, a user field of the same interface)
CASES = {
    "ode_classifier": (ODEClassifier, dict(in_features=4, state_dim=3), MLPField,
                       lambda: MLPField(3, 5)),
    "cnf": (CNF, dict(), ConcatSquashVelocity, lambda: ConcatSquashVelocity(2, 5, 1)),
    "latent_ode": (LatentODE, dict(latent_dim=2, hidden_dim=4), LatentField, lambda: LatentField(2, 5)),
    "cde": (NeuralCDE, dict(in_channels=3, hidden_dim=2), CDEFunc, lambda: CDEFunc(3, 2, 5, 1)),
    "sde": (SDEClassifier, dict(in_features=4, state_dim=3), ClassifierSDE, lambda: ClassifierSDE(3, 5, 0.5)),
    "latent_sde": (LatentSDE, dict(latent_dim=2, context_dim=2), LatentPosteriorSDE,
                   lambda: LatentPosteriorSDE(2, 2, 5, 0.5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_given_field_replaces_the_default_which_is_not_built(name):
    cls, kwargs, default, mine = CASES[name]
    strategy = Reversible("rk4", steps=2)
    field = mine()
    model = cls(strategy, field=field, **kwargs)
    assert any(m is field for m in model.modules())
    assert sum(isinstance(m, default) for m in model.modules()) == 1  # only the user's own one
    widths = {p.shape for p in field.parameters()}
    assert widths <= {p.shape for p in model.parameters()}
    assert sum(isinstance(m, default) for m in cls(strategy, **kwargs).modules()) == 1  # the default when none


def test_a_field_from_a_config_with_target():
    model = ODEClassifier(Direct("rk4", steps=2), in_features=4, state_dim=3,
                          field={"_target_": "nde_zoo.models.ode_classifier.MLPField", "state_dim": 3, "width": 7})
    assert model.field.hidden.out_features == 7
    assert model.hparams["field"]["width"] == 7


def test_a_field_from_the_command_line():
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=["model.state_dim=3",
                                        "model.field={_target_: nde_zoo.models.ode_classifier.MLPField, "
                                        "state_dim: 3, width: 6}"])
    _, model, _ = build(cfg)
    assert model.field.hidden.out_features == 6 and model.field.out.out_features == 3


def test_a_wrong_field_type_points_to_the_docs():
    with pytest.raises(TypeError, match="docs/extending.md"):
        ODEClassifier(Direct("rk4", steps=2), field="mlp")


class _ContextOnTheModule(nn.Module):
    """The wrong way: a context with autograd history, computed before the solve and closed over."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.linear, self.context = nn.Linear(3, 3), nn.Linear(3, 3), None

    def forward(self, t, z):
        return torch.tanh(self.linear(z)) + self.context


class _ContextInTheState(nn.Module):
    """The right way: the state is ``[z, context]``; the context's derivative is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, t, state):
        return torch.cat([torch.tanh(self.linear(state)), torch.zeros_like(state[:, 3:])], dim=1)


def test_context_closed_over_gives_an_error_pointing_to_the_docs():
    field = _ContextOnTheModule()
    model = ODEClassifier(Reversible("rk4", steps=3), in_features=4, state_dim=3, field=field)
    x = torch.randn(5, 4)
    field.context = field.encoder(x[:, :3])
    with pytest.raises(RuntimeError, match=r"docs/extending.md \('Your own vector field'\)"):
        model.backward(model(x).sum())


def test_context_through_the_state_trains_the_encoder_under_reversible_and_symplectic():
    torch.manual_seed(0)
    field, encoder = _ContextInTheState().double(), nn.Linear(4, 3).double()
    z0, x = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = []
    for strategy in (Direct("rk4", steps=4), Symplectic("rk4", steps=4), Reversible("rk4", steps=4)):
        y0 = torch.cat([z0, encoder(x)], dim=1)
        loss = strategy.solve(field, y0, ts).ys[-1, :, :3].pow(2).sum()
        grads.append(torch.autograd.grad(loss, [*field.parameters(), *encoder.parameters()]))
    direct, symplectic, reversible = grads
    for a, b, c in zip(direct, symplectic, reversible, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)  # the same discretisation: exact
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)  # the reversible scheme's own steps


# -- mixed precision --------------------------------------------------------------------------
SMALL = {
    "ode_classifier": ["data.batch_size=16", "model.state_dim=4", "model.width=8"],
    "cnf": ["data.n_train=64", "data.n_val=16", "data.n_test=16", "data.batch_size=32", "model.width=8"],
    "latent_ode": ["data.n_train=8", "data.n_val=4", "data.n_test=4", "data.batch_size=4", "model.hidden_dim=4",
                   "model.latent_dim=2", "model.field_width=8", "model.decoder_width=8", "model.encoder_width=8"],
    "cde": ["data.batch_size=16", "model.hidden_dim=4", "model.width=8"],
    "sde": ["data.batch_size=16", "model.state_dim=4", "model.width=8"],
    "latent_sde": ["data.n_train=8", "data.n_val=4", "data.n_test=4", "data.batch_size=4", "model.latent_dim=2",
                   "model.context_dim=2", "model.width=8", "model.encoder_hidden=4"],
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_reversible_trains_under_bf16_mixed_on_every_model(name, tmp_path):
    stepping = ["strategy.solver=rk4", "strategy.steps=2"] if name not in ("sde", "latent_sde") else []
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=[f"model={name}", "strategy=reversible", *stepping, *SMALL[name]])
    datamodule, model, _ = build(cfg)
    states = []
    solve = model.strategy.solve_sde if name in ("sde", "latent_sde") else model.strategy.solve

    def spy(*args, **kwargs):
        states.append(args[1].dtype)
        return solve(*args, **kwargs)

    setattr(model.strategy, "solve_sde" if name in ("sde", "latent_sde") else "solve", spy)
    trainer = hydra.utils.instantiate(cfg.trainer, max_steps=2, limit_val_batches=0, logger=False, callbacks=[],
                                      precision="bf16-mixed", enable_checkpointing=False,
                                      enable_progress_bar=False, enable_model_summary=False,
                                      default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2
    assert states and set(states) == {torch.float32}, states


def test_a_state_made_half_explicitly_is_still_refused():
    model = ODEClassifier(Reversible("rk4", steps=2), in_features=4, state_dim=3)
    with pytest.raises(TypeError, match="at least float32"):
        model.solve(model.field, torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([0.0, 1.0]))


def test_float16_autocast_keeps_the_state_float32():
    model = ODEClassifier(Reversible("rk4", steps=2), in_features=4, state_dim=3)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(torch.randn(2, 4))
    logits.float().sum().backward()
    assert all(p.grad is not None for p in model.field.parameters())
