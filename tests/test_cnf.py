"""The CNF: a normalised density, Hutchinson's trace, every strategy, the CLI job and its picture."""

from __future__ import annotations

import lightning
import pytest
import torch
from torch import Tensor, nn

from nde_zoo.datamodules import Toy2DDataModule
from nde_zoo.datamodules.toy2d import TOY2D, sample_toy2d
from nde_zoo.models import CNF
from nde_zoo.models.cnf import CNFField, ConcatSquashLinear, ConcatSquashVelocity, MLPVelocity
from nde_zoo.strategies import (Adjoint, Checkpoint, Direct, LocalERNODE, Reversible, Seminorm, Symplectic)

F64 = torch.float64
STRATEGIES = {
    "direct": lambda: Direct("rk4", steps=3),
    "checkpoint": lambda: Checkpoint("rk4", steps=3, snapshots=2),
    "adjoint": lambda: Adjoint("dopri5", rtol=1e-3, atol=1e-5),
    "seminorm": lambda: Seminorm("dopri5", rtol=1e-3, atol=1e-5),
    "reversible": lambda: Reversible("rk4", steps=3),
    "symplectic": lambda: Symplectic("dopri5", rtol=1e-3, atol=1e-5),
    "ernode": lambda: LocalERNODE(Reversible("rk4", steps=3)),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_trains_with_every_ode_strategy(name, tmp_path):
    lightning.seed_everything(0)
    model = CNF(STRATEGIES[name](), width=16)
    data = Toy2DDataModule(n_train=256, n_val=64, n_test=64, batch_size=128)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                                limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    nll = trainer.test(model, data, verbose=False)[0]["test/nll"]
    assert torch.isfinite(torch.tensor(nll))


def test_density_integrates_to_one():
    torch.manual_seed(0)
    model = CNF(Direct("dopri5", rtol=1e-7, atol=1e-9), width=16).double()
    with torch.no_grad():  # a nontrivial flow: scale up the random weights
        for p in model.parameters():
            p.mul_(2.0)
    xs = torch.linspace(-7, 7, 141, dtype=F64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    with torch.no_grad():
        density = model(grid).exp()
    cell = (xs[1] - xs[0]) ** 2
    total = float(density.sum() * cell)
    assert abs(total - 1.0) < 0.05, total
    # and the flow is not the identity: the density differs from the base's
    base = torch.exp(-0.5 * grid.pow(2).sum(1)) / (2 * torch.pi)
    assert (density - base).abs().max() > 1e-3


def test_hutchinson_agrees_with_the_exact_trace_in_expectation():
    torch.manual_seed(0)
    exact = CNFField(3, 16, 2, exact_trace_max_dim=8, noise="rademacher").double()
    for noise in ("rademacher", "gaussian"):
        hutch = CNFField(3, 16, 2, exact_trace_max_dim=1, noise=noise).double()
        hutch.load_state_dict(exact.state_dict())
        state = torch.randn(1, 4, dtype=F64).repeat(4000, 1)  # one point, many probes
        t = torch.tensor(0.3, dtype=F64)
        hutch.draw_probe(state, torch.Generator().manual_seed(1))
        estimates = -hutch(t, state)[:, 3]
        truth = -exact(t, state[:1])[0, 3]
        stderr = estimates.std() / 4000**0.5
        assert abs(estimates.mean() - truth) < 4 * stderr + 1e-12, (noise, estimates.mean(), truth, stderr)
        assert torch.allclose(hutch(t, state)[:, :3], exact(t, state)[:, :3])


def test_hutchinson_needs_a_probe():
    field = CNFField(10, 8, 1, exact_trace_max_dim=8, noise="rademacher")
    with pytest.raises(RuntimeError, match="draw_probe"):
        field(torch.tensor(0.0), torch.randn(2, 11))


class _ByAutograd(CNFField):
    """The same velocity, its trace taken by autograd: a subclass overriding ``velocity`` (a user's route)."""

    def velocity(self, t, z):
        return self.net(t, z)


VELOCITIES = {
    "concatsquash-elu": lambda dim: ConcatSquashVelocity(dim, 16, 2, "elu"),
    "concatsquash-softplus": lambda dim: ConcatSquashVelocity(dim, 16, 2, "softplus"),
    "concatsquash-tanh": lambda dim: ConcatSquashVelocity(dim, 16, 3, "tanh"),
    "concat": lambda dim: MLPVelocity(dim, 16, 2),
}


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("velocity", sorted(VELOCITIES))
def test_the_trace_by_hand_equals_autograds_with_its_gradients(velocity, trace):
    """The built-in velocities' forward-mode trace (``forward_and_jvp``) is autograd's trace to
    round-off, and so are the parameter gradients through it (float64). Large states push units
    past Softplus's linear threshold and deep into ELU's exponential branch."""
    torch.manual_seed(0)
    dim = 3
    net = VELOCITIES[velocity](dim).double()
    max_dim = 8 if trace == "exact" else 1
    by_hand = CNFField(dim, exact_trace_max_dim=max_dim, velocity=net)
    by_autograd = _ByAutograd(dim, exact_trace_max_dim=max_dim, velocity=net)
    assert by_hand.takes_trace_by_hand() and not by_autograd.takes_trace_by_hand()
    state = torch.cat([torch.randn(6, dim + 1, dtype=F64), 40 * torch.randn(2, dim + 1, dtype=F64)])
    t = torch.tensor(0.3, dtype=F64)
    outputs, grads = [], []
    for field in (by_hand, by_autograd):
        field.draw_probe(state, torch.Generator().manual_seed(1))
        y = state.clone().requires_grad_()
        out = field(t, y)
        weights = torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape)
        grads.append(torch.autograd.grad((out * weights).sum(), [y, *net.parameters()]))
        outputs.append(out.detach())
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


class _FasterVelocity(ConcatSquashVelocity):
    """A user's subclass that changes ``forward`` alone: its inherited products would differentiate the parent."""

    def forward(self, t, z):
        return 2 * super().forward(t, z)


class _SquashedLayer(ConcatSquashLinear):
    def forward(self, t, x):
        return torch.tanh(super().forward(t, x))


def _gelu_velocity(dim):
    net = ConcatSquashVelocity(dim, 8, 1)
    net.activation = nn.GELU()  # a layer the products do not know
    return net


def _squashed_layer_velocity(dim):
    net = ConcatSquashVelocity(dim, 8, 1)
    net.layers[0] = _SquashedLayer(dim, 8)
    return net


@pytest.mark.parametrize("make", [lambda dim: _FasterVelocity(dim, 8, 1), _gelu_velocity, _squashed_layer_velocity],
                         ids=["forward-overridden", "unknown-activation", "layer-forward-overridden"])
def test_a_velocity_its_products_may_not_match_is_differentiated_by_autograd(make):
    """Never a silently wrong trace: where ``forward_and_jvp`` might not differentiate ``forward``, the
    trace is autograd's of ``forward`` itself."""
    torch.manual_seed(0)
    net = make(2)
    field = CNFField(2, velocity=net.double())
    assert not field.takes_trace_by_hand()
    state, t = torch.randn(5, 3, dtype=F64), torch.tensor(0.4, dtype=F64)
    expected = _ByAutograd(2, velocity=net)(t, state)
    assert torch.equal(field(t, state), expected)
    z = state[:, :2].clone().requires_grad_()
    jacobian = torch.autograd.functional.jacobian(lambda z: net(t, z).sum(0), z)  # (2, batch, 2)
    assert torch.allclose(-expected[:, 2].detach(), jacobian.diagonal(dim1=0, dim2=2).sum(1), atol=1e-12)


def test_the_built_in_flow_runs_under_inference_mode():
    torch.manual_seed(0)
    model = CNF(Direct("rk4", steps=2), width=8)
    x = torch.randn(4, 2)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


def test_inference_mode_is_refused_clearly_for_a_trace_taken_by_autograd():
    model = CNF(Direct("rk4", steps=2), field=_ByAutograd(2, velocity=MLPVelocity(2, 8, 1)))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=false"):
        model(torch.randn(4, 2))


@pytest.mark.parametrize("name", sorted(TOY2D))
def test_toy_datasets_are_fixed_and_two_dimensional(name):
    a, b = sample_toy2d(name, 100, 3), sample_toy2d(name, 100, 3)
    assert a.shape == (100, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="unknown 2-D dataset 'spiral'"):
        Toy2DDataModule(dataset="spiral")


def test_samples_have_the_data_dimension():
    model = CNF(Reversible("rk4", steps=2), width=8)
    assert model.sample(5, torch.Generator().manual_seed(0)).shape == (5, 2)


def test_cli_fit_writes_the_picture(cli, tmp_path):
    out = cli("fit", "model=cnf", "strategy=reversible", "strategy.solver=rk4", "strategy.steps=2",
              "strategy.rtol=null", "strategy.atol=null", "trainer.max_steps=2", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "data.n_train=256",
              "model.width=8", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert next((tmp_path / "outputs").glob("fit/cnf/*/cnf_samples.png")).is_file()


class _LinearFlow(CNFField):
    """``dz/dt = W z``: the log-density is known in closed form."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__(dim=2, width=1, depth=1, exact_trace_max_dim=8, noise="rademacher")
        self.weight = nn.Parameter(weight)

    def velocity(self, t, z):
        return z @ self.weight.T


class _LinearCNF(CNF):
    """A downstream CNF: only the ``vector_field`` hook changes; likelihood, sampling, training are inherited."""

    def __init__(self, strategy, weight: Tensor) -> None:
        super().__init__(strategy, dim=2)
        self.linear = _LinearFlow(weight)

    def vector_field(self) -> CNFField:
        return self.linear


def test_a_subclass_overrides_only_the_vector_field():
    weight = torch.tensor([[0.3, -0.5], [0.2, -0.1]], dtype=F64)
    model = _LinearCNF(Direct("dopri5", rtol=1e-10, atol=1e-12), weight).double()
    x = torch.randn(16, 2, dtype=F64)
    z = x @ torch.linalg.matrix_exp(weight).T  # flow to t1 = 1
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1) + torch.trace(weight)
    torch.testing.assert_close(model(x), expected, rtol=1e-8, atol=1e-8)
    model.training_step(x, 0).backward()
    assert model.linear.weight.grad is not None and all(p.grad is None for p in model.field.parameters())


def test_learning_rate_follows_the_cosine_down_to_its_final_factor(tmp_path):
    """NeuralDE's schedule (shared by the CNF, the CDE and the latent ODE): lr -> lr * lr_final_factor."""
    lightning.seed_everything(0)
    model = CNF(Direct("rk4", steps=2), width=8, lr=1e-2, lr_final_factor=0.1)
    data = Toy2DDataModule(n_train=256, n_val=64, n_test=64, batch_size=64)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                                limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    assert trainer.global_step == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert CNF(Direct("rk4", steps=2), width=8).configure_optimizers().__class__.__name__ == "AdamW"


def test_products_by_hand_name_an_activation_they_do_not_know():
    from nde_zoo.models.cnf import activation_and_jvp

    a = torch.randn(3, 4)
    h, v = activation_and_jvp(nn.GELU(), a, None)  # no tangents: just the activation
    assert torch.equal(h, nn.GELU()(a)) and v is None
    with pytest.raises(TypeError, match="no derivative by hand for GELU"):
        activation_and_jvp(nn.GELU(), a, torch.ones(1, 2, 4))
