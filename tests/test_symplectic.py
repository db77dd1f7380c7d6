"""Symplectic adjoint: the gradient of the RK discretisation, with one field graph at a time.

Checked three ways (STYLE 10): against backprop through the same discretisation
(``Direct``) for every tableau, fixed and adaptive, with losses on several output times;
with ``torch.autograd.gradcheck``; and on a CNF-style field that differentiates inside
its forward. Plus the property that justifies it: bytes kept for backward are the ``N``
stored states and nothing else, and during backward only one field graph is alive.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from nde_zoo.solvers import get_tableau, solver_names
from nde_zoo.strategies import Direct, Symplectic
from nde_zoo.strategies.symplectic import _stages_needed

REPO = Path(__file__).resolve().parents[1]


class TimeMLP(nn.Module):
    """A non-autonomous MLP field ``f(t, y)``: the time enters as an extra input."""

    def __init__(self, dim: int = 3, width: int = 16, scale: float = 1.0) -> None:
        super().__init__()
        self.inp = nn.Linear(dim + 1, width)
        self.out = nn.Linear(width, dim)
        with torch.no_grad():
            self.inp.weight.mul_(2.0 if scale != 1.0 else 1.0)
            self.out.weight.mul_(scale)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.expand(y.shape[0], 1).to(y)
        return self.out(torch.tanh(self.inp(torch.cat([y, tt], dim=1))))


class ToyCNF(nn.Module):
    """FFJORD-style field on a packed state ``(z, log p)``: the exact divergence is taken
    with autograd *inside* the forward (``create_graph=True``), as a CNF does."""

    def __init__(self, dim: int = 2, width: int = 12) -> None:
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = y[:, : self.dim]
            if not z.requires_grad:  # a graph-free forward pass: differentiate inside only
                z = z.detach().requires_grad_()
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))  # (batch, dim)
            div = sum(
                torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(self.dim)
            )
        return torch.cat([dz, -div[:, None]], dim=1)  # (batch, dim + 1)


def _grads(strategy, field, y0, ts, weights):
    sol = strategy.solve(field, y0, ts)
    loss = (sol.ys * weights).sum() + sol.ys.pow(2).sum() * 0.1
    grads = torch.autograd.grad(loss, [y0, *field.parameters()], allow_unused=True)
    return sol, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [y0, *field.parameters()])]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not b.abs().max() > 0:  # a parameter the loss does not reach (a solve with no steps)
        return float(a.abs().max())
    return float((a - b).abs().max() / b.abs().max())


def _compare(field, y0, ts, **kwargs):
    """Symplectic vs Direct on one discretisation; returns both solutions and the worst error."""
    torch.manual_seed(1)
    weights = torch.randn(len(ts), *y0.shape, dtype=y0.dtype)
    sol_d, g_d = _grads(Direct(**kwargs), field, y0, ts, weights)
    sol_s, g_s = _grads(Symplectic(**kwargs), field, y0, ts, weights)
    assert sol_s.path.times == sol_d.path.times, "not the same accepted steps"
    assert sol_s.path.output_steps == sol_d.path.output_steps
    assert sol_s.path.sizes == sol_d.path.sizes
    assert torch.equal(sol_s.ys, sol_d.ys), "forward values differ from Direct's"
    return sol_d, sol_s, max(_rel(a, b) for a, b in zip(g_s, g_d))


ADAPTIVE_TOL = {"heun": 1e-3, "bosh3": 1e-4}  # others 1e-5: ~10-40 accepted steps each
CASES = [(name, "fixed") for name in solver_names()] + [
    (name, "adaptive") for name in solver_names() if get_tableau(name).adaptive
]


@pytest.mark.parametrize("name,mode", CASES)
def test_gradient_equals_direct(name, mode):
    torch.manual_seed(0)
    field = TimeMLP(scale=10.0 if mode == "adaptive" else 1.0).double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=torch.float64)  # 3 outputs between grid points
    if mode == "fixed":
        kwargs = dict(solver=name, steps=7)
    else:
        tol = ADAPTIVE_TOL.get(name, 1e-5)
        kwargs = dict(solver=name, rtol=tol, atol=tol * 1e-2)
    sol_d, sol_s, err = _compare(field, y0, ts, **kwargs)
    assert err <= 1e-10, f"{name} {mode}: relative gradient error {err:.3g}"
    if mode == "adaptive":
        assert sol_s.stats.rejected_steps > 0, "the case should exercise rejected steps"
    assert sol_s.stats.nfe_forward == sol_d.stats.nfe_forward
    # Backward cost: a graph-free recomputation up to the last needed stage, then one
    # evaluation with a graph per needed stage (FSAL: the last stage is never evaluated).
    needed = _stages_needed(get_tableau(name))
    last = max(i for i, n in enumerate(needed) if n)
    assert sol_s.stats.nfe_backward == sol_s.path.steps * (last + sum(needed))


def test_stages_needed_keeps_zero_weight_stages_used_later():
    assert _stages_needed(get_tableau("midpoint")) == [True, True]  # b_0 = 0 but a_10 = 1/2
    assert _stages_needed(get_tableau("dopri5")) == [True] * 6 + [False]  # FSAL stage dropped
    assert _stages_needed(get_tableau("rk4")) == [True] * 4


def test_float32_close_to_direct():
    torch.manual_seed(0)
    field = TimeMLP()
    y0 = torch.randn(5, 3, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0])
    _, _, err = _compare(field, y0, ts, solver="tsit5", rtol=1e-4, atol=1e-6)
    assert err <= 1e-4


def test_single_output_time_and_reversed_time():
    torch.manual_seed(0)
    field = TimeMLP().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    _, sol_s, err = _compare(field, y0, torch.tensor([0.5], dtype=torch.float64), solver="rk4", steps=3)
    assert err == 0.0 and sol_s.path.steps == 0 and sol_s.stats.nfe_backward == 0
    ts = torch.tensor([1.0, 0.4, -0.5], dtype=torch.float64)  # integrate backwards in time
    _, _, err = _compare(field, y0, ts, solver="dopri5", rtol=1e-6, atol=1e-8)
    assert err <= 1e-10


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_cnf_style_field_with_inner_autograd(mode):
    torch.manual_seed(0)
    field = ToyCNF().double()
    y0 = torch.cat([torch.randn(6, 2), torch.zeros(6, 1)], dim=1).double().requires_grad_()
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    kwargs = dict(solver="dopri5", steps=6) if mode == "fixed" else dict(solver="tsit5", rtol=1e-6, atol=1e-8)
    _, sol_s, err = _compare(field, y0, ts, **kwargs)
    assert err <= 1e-10
    # The graph the field builds inside its own forward is not counted as kept for backward.
    assert sol_s.saved_bytes == sol_s.path.steps * y0.nbytes


@pytest.mark.parametrize("solver", ["rk4", "midpoint", "bosh3"])
def test_gradcheck(solver):
    torch.manual_seed(0)
    field = TimeMLP(dim=2, width=4).double()
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    strategy = Symplectic(solver=solver, steps=4)

    def solve(y0, *params):  # gradcheck perturbs the parameters in place
        return strategy.solve(field, y0, ts).ys

    assert torch.autograd.gradcheck(solve, (y0, *field.parameters()), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_plain_function_field_without_parameters():
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = Symplectic(solver="rk4", steps=10).solve(lambda t, y: -y * torch.cos(t), y0, ts)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), y0)
    # y(1) = y0 exp(-sin 1): the discretisation's gradient is that to RK4 accuracy.
    assert torch.allclose(g, torch.full_like(g, torch.exp(-torch.sin(torch.tensor(1.0))).item()), atol=1e-6)


def test_memory_is_the_stored_states_only():
    """N=200 steps of a wide field: Symplectic keeps N states, Direct every stage's graph."""
    torch.manual_seed(0)
    dim, width, batch = 4, 512, 64
    field = TimeMLP(dim=dim, width=width)
    y0 = torch.randn(batch, dim, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0])
    sym = {n: Symplectic(solver="rk4", steps=n).solve(field, y0, ts) for n in (100, 200)}
    for n, sol in sym.items():
        assert sol.path.steps == n
        assert sol.saved_bytes == n * y0.nbytes, f"N={n}: {sol.saved_bytes} bytes kept for {n} states"
    direct = Direct(solver="euler", steps=200).solve(field, y0, ts)  # the cheapest backprop graph
    assert direct.saved_bytes >= 20 * sym[200].saved_bytes, (direct.saved_bytes, sym[200].saved_bytes)
    del direct


class _LiveSavedBytes:
    """Bytes saved for backward that are *alive* at once (freed when a graph is freed); peak."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        outer = self

        class Held:
            def __init__(self, tensor):
                self.tensor = tensor.detach()  # no reference cycle through an output's grad_fn
                self.nbytes = tensor.untyped_storage().nbytes()
                outer.live += self.nbytes
                outer.peak = max(outer.peak, outer.live)

            def __del__(self):
                outer.live -= self.nbytes

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor)


def test_backward_holds_one_field_graph_at_a_time():
    torch.manual_seed(0)
    field = TimeMLP(dim=4, width=256)
    y0 = torch.randn(32, 4, requires_grad=True)
    ts = torch.tensor([0.0, 1.0])
    one_eval = _LiveSavedBytes()
    with one_eval.hooks:
        k = field(ts[0], y0.detach().requires_grad_())
    single = one_eval.peak
    del k
    sol = Symplectic(solver="dopri5", steps=20).solve(field, y0, ts)
    during = _LiveSavedBytes()
    with during.hooks:
        sol.ys.sum().backward()
    assert sol.stats.nfe_backward > 0
    # Parameters are saved by reference (their storage is counted in each graph): allow one graph.
    assert 0 < during.peak <= single, (during.peak, single)


class _ClosesOver(nn.Module):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.inner = TimeMLP()
        self.hidden = hidden  # a plain attribute, not a parameter: found by the graph walk

    def forward(self, t, y):
        return self.inner(t, y) * self.hidden


def test_a_tensor_closed_over_gets_its_gradient():
    """A plain attribute requiring grad (not a parameter) is found by the graph walk and gets
    Direct's gradient exactly (it used to be refused in backward)."""
    torch.manual_seed(0)
    field = _ClosesOver(torch.randn(3, dtype=torch.float64, requires_grad=True)).double()
    y0, ts = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = []
    for strategy in (Direct(solver="rk4", steps=3), Symplectic(solver="rk4", steps=3)):
        field.hidden.grad = None
        strategy.solve(field, y0, ts).ys.sum().backward()
        grads.append(field.hidden.grad.clone())
    assert float(grads[1].abs().max()) > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_config_mirrors_constructor():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("fit", overrides=["strategy=symplectic"]).strategy
    keys = set(cfg) - {"_target_"}
    assert keys == set(inspect.signature(Symplectic.__init__).parameters) - {"self"}
    strategy = instantiate(cfg)
    assert isinstance(strategy, Symplectic) and strategy.name == "symplectic"
    assert strategy.tableau.name == "dopri5" and strategy.stepping.adaptive


def test_adaptive_with_fixed_step_solver_is_refused():
    with pytest.raises(ValueError, match="no embedded error estimate"):
        Symplectic(solver="rk4", rtol=1e-3, atol=1e-6)


def test_kdv_generator_carries_a_soliton_at_its_speed():
    """The benchmark's data: u = 3c sech^2(sqrt(c) (x - ct) / (2 delta)) solves
    u_t + u u_x + delta^2 u_xxx = 0 exactly; the pseudo-spectral solver must keep it."""
    import math

    from nde_zoo.bench.kdv import kdv_solve

    delta, c, points = 0.15, 1.0, 128
    x = torch.arange(points, dtype=torch.float64) * (2 * math.pi / points)

    def soliton(t: float) -> torch.Tensor:
        return 3 * c / torch.cosh(math.sqrt(c) / (2 * delta) * (x - math.pi - c * t)) ** 2

    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    u = kdv_solve(soliton(0.0)[None], ts, delta=delta, dt=2e-3)  # (time, 1, points)
    for i, t in enumerate(ts.tolist()):
        assert float((u[i, 0] - soliton(t)).abs().max()) < 1e-5 * 3 * c, t
