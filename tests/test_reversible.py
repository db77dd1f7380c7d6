"""The reversible strategy: exact gradients of its own discretisation, order, flat memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nde_zoo.solvers import get_tableau, integrate, rk_increment
from nde_zoo.strategies import Direct, Reversible

F64 = torch.float64


class MLP(nn.Module):
    def __init__(self, dim=3, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(dim + 1, width)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(y.shape[0], 1)], -1))))


def reference_solve(field, y0, ts, solver, stepping, coupling):
    """The same coupled recursion with autograd on: backprop through it is the reference."""
    tableau = get_tableau(solver)

    def step(t, state, h, carry):
        y, z = state
        psi, err = rk_increment(field, t, z, h, tableau)
        y1 = torch.add(torch.add(psi, y, alpha=coupling), z, alpha=1 - coupling)  # as the strategy does
        back, _ = rk_increment(field, t + h, y1, -h, tableau)
        return (y1, z - back), err, None

    first = None
    if stepping.adaptive:
        from nde_zoo.solvers import initial_step_size

        def first():
            with torch.no_grad():
                f0 = field(ts[0], y0)
                return initial_step_size(field, ts[0], y0, f0, tableau.order - 1, stepping.rtol, stepping.atol)

    outs, path, _ = integrate(step, (y0, y0), lambda s: s[0], ts.tolist(), ts[0], stepping, tableau.order, first_step=first)
    return torch.stack(outs), path


def grads(loss, field, y0):
    params = list(field.parameters())
    return torch.autograd.grad(loss, [y0, *params])


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def loss_on_all(ys):
    weights = torch.arange(1, ys.shape[0] + 1, dtype=ys.dtype).view(-1, *([1] * (ys.dim() - 1)))
    return (weights * ys.sin()).sum()


@pytest.mark.parametrize("solver", ["midpoint", "rk4", "dopri5"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_gradients_equal_backprop_through_the_same_recursion(solver, adaptive, dtype, tol):
    if adaptive and not get_tableau(solver).adaptive:
        pytest.skip("fixed-step method")
    field = MLP().to(dtype)
    y0 = torch.randn(4, 3, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
    ts = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=dtype)
    kwargs = dict(rtol=1e-5, atol=1e-7) if adaptive else dict(steps=13)
    strategy = Reversible(solver, coupling=0.9, **kwargs)
    sol = strategy.solve(field, y0, ts)
    got = grads(loss_on_all(sol.ys), field, y0)
    ref_ys, ref_path = reference_solve(field, y0, ts, solver, strategy.stepping, 0.9)
    assert ref_path.times == sol.path.times  # the same accepted steps
    assert torch.allclose(sol.ys, ref_ys, rtol=0, atol=10 * torch.finfo(dtype).eps)
    want = grads(loss_on_all(ref_ys), field, y0)
    for g, w in zip(got, want):
        assert rel(g, w) < tol
    assert sol.stats.nfe_backward > 0
    assert sol.extras["reconstruction_error"] < math.sqrt(torch.finfo(dtype).eps)


@pytest.mark.parametrize("solver, order", [("midpoint", 2), ("ralston3", 3), ("rk4", 4)])
def test_order_of_convergence_equals_the_base_method(solver, order):
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
    exact = y0 @ torch.linalg.matrix_exp(A.T * 2.0)
    errors = []
    for n in (20, 40, 80):
        sol = Reversible(solver, steps=n, coupling=0.999).solve(lambda t, y: y @ A.T, y0, torch.tensor([0.0, 2.0], dtype=F64))
        errors.append((sol.ys[-1] - exact).abs().max().item())
    slope = math.log2(errors[-2] / errors[-1])
    assert abs(slope - order) < 0.3, (errors, slope)


def test_memory_is_flat_in_the_number_of_steps():
    field = MLP(dim=8, width=64).double()
    y0 = torch.randn(32, 8, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    saved = {n: Reversible("midpoint", steps=n).solve(field, y0, ts).saved_bytes for n in (10, 1000)}
    assert abs(saved[1000] - saved[10]) <= 0.05 * saved[10], saved
    direct = Direct("midpoint", steps=1000).solve(field, y0, ts).saved_bytes
    assert direct > 100 * saved[1000]


def test_gradcheck():
    field = MLP(dim=2, width=4).double()
    y0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    strategy = Reversible("rk4", steps=5)
    # y0 directly; the parameters are checked against the reference recursion above
    assert torch.autograd.gradcheck(lambda y: strategy.solve(field, y, ts).ys, (y0,))


class DivergenceField(nn.Module):
    """A CNF-style field: returns [f(z), -tr(df/dz)] computed with autograd inside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, t, state):
        with torch.enable_grad():
            z = state[:, :2]
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            f = self.net(z)
            div = sum(torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return torch.cat([f, -div[:, None]], dim=1)


def test_field_with_autograd_inside_matches_reference():
    field = DivergenceField().double()
    y0 = torch.randn(5, 3, dtype=F64).requires_grad_()
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    strategy = Reversible("rk4", steps=6)
    got = grads(loss_on_all(strategy.solve(field, y0, ts).ys), field, y0)
    ref_ys, _ = reference_solve(field, y0, ts, "rk4", strategy.stepping, 0.999)
    want = grads(loss_on_all(ref_ys), field, y0)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-10


@pytest.mark.parametrize("coupling", [0.0, -0.5, 1.5, float("nan")])
def test_coupling_out_of_range(coupling):
    with pytest.raises(ValueError, match=r"coupling must be in \(0, 1\]"):
        Reversible("rk4", steps=2, coupling=coupling)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refuses_half_precision_states(dtype):
    with pytest.raises(TypeError, match="at least float32"):
        Reversible("rk4", steps=2).solve(lambda t, y: -y, torch.ones(2, 2, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype))


def test_autocast_keeps_the_state_in_float32():
    field = MLP()
    y0 = torch.randn(3, 3, requires_grad=True)
    ts = torch.tensor([0.0, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = Reversible("rk4", steps=4).solve(field, y0, ts)
    assert sol.ys.dtype == torch.float32
    sol.ys.sum().backward()
    assert y0.grad is not None and torch.isfinite(y0.grad).all()


def test_a_tensor_closed_over_gets_its_gradient():
    """A leaf the field closes over (here in a lambda) is found and differentiated: the same
    gradient as when it is registered as the field's parameter (it used to be refused in backward)."""
    torch.manual_seed(0)
    field, y0, ts = MLP().double(), torch.randn(2, 3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale, self.field = nn.Parameter(torch.tensor(2.0, dtype=torch.float64)), field

        def forward(self, t, y):
            return self.scale * self.field(t, y)

    module = Scaled()
    Reversible("rk4", steps=2).solve(module, y0, ts).ys.sum().backward()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    field.zero_grad()
    Reversible("rk4", steps=2).solve(lambda t, y: scale * field(t, y), y0, ts).ys.sum().backward()
    assert float(scale.grad.abs()) > 0
    torch.testing.assert_close(scale.grad, module.scale.grad, rtol=1e-12, atol=0)


def test_poor_reconstruction_warns_and_names_the_knobs():
    # A stiff linear field, big steps and a small coupling: the rebuild amplifies round-off.
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(-30.0 * torch.eye(4, dtype=F64) + torch.randn(4, 4, dtype=F64))

        def forward(self, t, y):
            return y @ self.weight.T

    y0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    sol = Reversible("rk4", steps=40, coupling=0.05).solve(Linear(), y0, torch.tensor([0.0, 4.0], dtype=F64))
    with pytest.warns(RuntimeWarning, match=r"rebuilt y0 with relative error .*raise coupling.*float64"):
        sol.ys.sum().backward()
    assert sol.extras["reconstruction_error"] > 1e-8
