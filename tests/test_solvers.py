"""The solver core: tableaux, orders of convergence, torchdiffeq parity, and every error."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

from nde_zoo.solvers import (
    TABLEAUX,
    ButcherTableau,
    MaxStepsExceeded,
    NonFiniteStateError,
    StepSizeUnderflow,
    Stepping,
    get_tableau,
    odeint,
    solver_names,
)
from nde_zoo.solvers.stepping import fixed_grid

F64 = torch.float64
A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)


def linear_field(t, y):
    return y @ A.T


def exact_linear(y0, t):
    return y0 @ torch.linalg.matrix_exp(A.T * t)


@pytest.mark.parametrize("name", solver_names())
def test_order_of_convergence(name):
    """Slope of log error vs log h on a linear ODE with a known solution equals the order."""
    tableau = get_tableau(name)
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
    T = 2.0
    exact = exact_linear(y0, T)
    ns = [10, 20, 40] if tableau.order < 5 else [6, 12, 24]
    errors = []
    for n in ns:
        ys, _, _ = odeint(linear_field, y0, torch.tensor([0.0, T], dtype=F64), tableau, Stepping(steps=n))
        errors.append((ys[-1] - exact).abs().max().item())
    slope = math.log(errors[-2] / errors[-1], 2)
    assert abs(slope - tableau.order) < 0.35, (name, errors, slope)


def test_registry_is_complete():
    assert set(solver_names()) == {
        "euler", "midpoint", "heun", "ralston", "ralston3", "rk4", "rk38", "bosh3", "dopri5", "tsit5"
    }
    assert TABLEAUX["rk4"].b == pytest.approx((1 / 6, 1 / 3, 1 / 3, 1 / 6))
    assert TABLEAUX["rk38"].b == pytest.approx((1 / 8, 3 / 8, 3 / 8, 1 / 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(c=(0.0, 0.5), a=((), (0.4,)), b=(0.0, 1.0)), "row 1 of a sums to"),
        (dict(c=(0.0, 0.5), a=((), (0.5,)), b=(0.5, 0.6)), "sum(b)"),
        (dict(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), b_error=(0.1, 0.0)), "sum(b_error)"),
        (dict(c=(0.0,), a=((), ()), b=(1.0,)), "strictly lower triangular"),
    ],
)
def test_tableau_validates_itself(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ButcherTableau("bad", order=1, **kwargs)


def test_unknown_solver_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown solver 'rk5'.*dopri5.*tsit5"):
        get_tableau("rk5")


class MLPField(torch.nn.Module):
    def __init__(self, dim=2, width=32):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, dim))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("tol", [1e-5, 1e-8])
def test_adaptive_matches_torchdiffeq(method, tol):
    """Same solution at tight tolerance; forward NFE within 10% for the same rtol/atol."""
    field = MLPField().double()
    y0 = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([0.0, 3.0], dtype=F64)
    with torch.no_grad():
        field.nfe = 0
        torchdiffeq.odeint(field, y0, ts, method=method, rtol=tol, atol=tol)
        nfe_ref = field.nfe
        ys, path, stats = odeint(field, y0, ts, get_tableau(method), Stepping.of(rtol=tol, atol=tol))
    assert abs(stats.nfe_forward - nfe_ref) <= 0.1 * nfe_ref, (stats.nfe_forward, nfe_ref)
    tight, _, _ = odeint(field, y0, ts, get_tableau(method), Stepping.of(rtol=1e-11, atol=1e-11))
    ref_tight = torchdiffeq.odeint(field, y0, ts, method=method, rtol=1e-11, atol=1e-11)
    # global error of a 3rd-order pair at tol 1e-11 is ~1e-8, of a 5th-order one ~1e-10
    assert (tight[-1] - ref_tight[-1]).abs().max().item() < (1e-9 if method == "dopri5" else 1e-7)


def test_fixed_rk38_equals_torchdiffeq_rk4():
    """torchdiffeq's fixed-grid 'rk4' is Kutta's 3/8 rule: bitwise-close to our rk38."""
    field = MLPField().double()
    y0 = torch.randn(4, 2, dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    with torch.no_grad():
        ref = torchdiffeq.odeint(field, y0, ts, method="rk4", options=dict(step_size=0.05))
        ys, path, _ = odeint(field, y0, ts, get_tableau("rk38"), Stepping(step_size=0.05))
    assert path.steps == 20
    assert torch.allclose(ys, ref, rtol=1e-12, atol=1e-13)


def test_lands_exactly_on_output_times():
    ts = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.0], dtype=F64)
    y0 = torch.ones(1, 2, dtype=F64)
    for stepping in (Stepping(steps=7), Stepping(step_size=0.1), Stepping.of(rtol=1e-6, atol=1e-8)):
        ys, path, _ = odeint(linear_field, y0, ts, get_tableau("dopri5"), stepping)
        assert [path.times[k] for k in path.output_steps] == ts.tolist()
        for j, t in enumerate(ts.tolist()):
            assert torch.allclose(ys[j], exact_linear(y0, t), atol=1e-4)


def test_fixed_grid_steps_and_no_slivers():
    grid = fixed_grid([0.0, 0.5, 1.0], Stepping(steps=4))
    assert grid == [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = fixed_grid([0.0, 0.3, 1.0], Stepping(steps=2))
    assert grid == [0.0, 0.3, 0.5, 1.0]
    grid = fixed_grid([1.0, 0.0], Stepping(step_size=0.3))
    assert grid == pytest.approx([1.0, 0.7, 0.4, 0.1, 0.0])


def test_backwards_in_time_inverts_forwards():
    y0 = torch.tensor([[1.0, -1.0]], dtype=F64)
    tab = get_tableau("dopri5")
    fwd, _, _ = odeint(linear_field, y0, torch.tensor([0.0, 1.0], dtype=F64), tab, Stepping.of(rtol=1e-10, atol=1e-12))
    back, _, _ = odeint(linear_field, fwd[-1], torch.tensor([1.0, 0.0], dtype=F64), tab, Stepping.of(rtol=1e-10, atol=1e-12))
    assert torch.allclose(back[-1], y0, atol=1e-8)


def test_stats_count_steps_and_nfe():
    y0 = torch.ones(3, 2, dtype=F64)
    _, path, stats = odeint(linear_field, y0, torch.tensor([0.0, 1.0], dtype=F64), get_tableau("rk4"), Stepping(steps=10))
    assert stats.nfe_forward == 40 and stats.accepted_steps == 10 and path.steps == 10
    _, path, stats = odeint(linear_field, y0, torch.tensor([0.0, 1.0], dtype=F64), get_tableau("dopri5"), Stepping.of(rtol=1e-6))
    # FSAL: 6 new evaluations per attempted step after the first (7) plus 2 for the initial step.
    attempts = stats.accepted_steps + stats.rejected_steps
    assert stats.nfe_forward == 2 + 7 + 6 * (attempts - 1)


# ---- errors: each one names what went wrong and a fix -------------------------------------


def test_max_steps_exhausted_says_the_time_reached():
    y0 = torch.ones(1, 2, dtype=F64)
    with pytest.raises(MaxStepsExceeded, match=r"max_steps=5 .*reached only t=.* raise max_steps"):
        odeint(linear_field, y0, torch.tensor([0.0, 100.0], dtype=F64), get_tableau("dopri5"),
               Stepping.of(rtol=1e-9, atol=1e-9, max_steps=5))


def test_step_size_underflow():
    # y' = y^2 blows up at t = 1 for y0 = 1: the controller shrinks h until it underflows.
    def blowup(t, y):
        return y * y

    y0 = torch.ones(1, 1, dtype=F64)
    with pytest.raises((StepSizeUnderflow, NonFiniteStateError), match=r"t=0\.99|t=1"):
        odeint(blowup, y0, torch.tensor([0.0, 2.0], dtype=F64), get_tableau("dopri5"), Stepping.of(rtol=1e-6, atol=1e-6))


def test_step_size_underflow_is_raised_with_its_message():
    def kink(t, y):  # discontinuous in time: no step across t = 0.5 is ever accurate enough
        return torch.where(t < 0.5, -1e12 * y, 1e12 * y) + torch.where(t < 0.5, 1.0, -1.0) * 1e10

    y0 = torch.ones(1, 1, dtype=F64)
    with pytest.raises(StepSizeUnderflow, match=r"underflowed .* at t=.*loosen rtol/atol"):
        odeint(kink, y0, torch.tensor([0.0, 1.0], dtype=F64), get_tableau("bosh3"),
               Stepping.of(rtol=1e-12, atol=1e-12, max_steps=100_000))


def test_non_finite_state_fixed_steps_names_the_time():
    def explode(t, y):
        return torch.where(t > 0.45, torch.full_like(y, float("nan")), y)

    y0 = torch.ones(2, 2, dtype=F64)
    with pytest.raises(NonFiniteStateError, match=r"NaN or infinite by t=0\.5 \(it was finite at t=0\.25\)"):
        odeint(explode, y0, torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64), get_tableau("rk4"), Stepping(steps=8))


def test_non_finite_state_adaptive_names_the_step():
    def explode(t, y):
        return torch.where(t > 0.45, torch.full_like(y, float("inf")), y)

    y0 = torch.ones(2, 2, dtype=F64)
    with pytest.raises(NonFiniteStateError, match=r"NaN or infinite in the step from t="):
        odeint(explode, y0, torch.tensor([0.0, 1.0], dtype=F64), get_tableau("dopri5"), Stepping.of())


@pytest.mark.parametrize(
    "ts, message",
    [
        ([0.0, 0.5, 0.5, 1.0], r"strictly monotone.*ts\[1\] = 0.5 and ts\[2\] = 0.5"),
        ([0.0, 0.7, 0.5, 1.0], r"strictly monotone.*ts\[1\] = 0.7 and ts\[2\] = 0.5"),
        ([0.0, float("nan")], "ts must be finite"),
    ],
)
def test_bad_ts(ts, message):
    with pytest.raises(ValueError, match=message):
        odeint(linear_field, torch.ones(1, 2, dtype=F64), torch.tensor(ts, dtype=F64), get_tableau("rk4"), Stepping(steps=4))


def test_ts_must_be_one_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        odeint(linear_field, torch.ones(1, 2, dtype=F64), torch.zeros(2, 2, dtype=F64), get_tableau("rk4"), Stepping(steps=4))


def test_shape_mismatch_explains_each_dimension():
    def wrong(t, y):
        return torch.zeros(y.shape[0], 3, dtype=y.dtype)

    with pytest.raises(ValueError, match=r"returned shape \(5, 3\).*batch=5, state dim 1=2.*dimension 1: field gives 3, state has 2"):
        odeint(wrong, torch.ones(5, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), get_tableau("rk4"), Stepping(steps=2))


def test_dtype_mismatch_between_ts_and_y0():
    with pytest.raises(TypeError, match=r"ts is torch.float32 but y0 is torch.float64.*ts.to\(y0\)"):
        odeint(linear_field, torch.ones(1, 2, dtype=F64), torch.tensor([0.0, 1.0]), get_tableau("rk4"), Stepping(steps=2))


def test_dtype_mismatch_between_field_and_state():
    field = torch.nn.Linear(2, 2)  # float32 weights, float64 state

    with pytest.raises((TypeError, RuntimeError), match=r"dtype|Double|Float"):
        odeint(lambda t, y: field(y), torch.ones(1, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               get_tableau("rk4"), Stepping(steps=2))

    def returns_float32(t, y):
        return y.float()

    with pytest.raises(TypeError, match=r"returned torch.float32 .* for a state of torch.float64"):
        odeint(returns_float32, torch.ones(1, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               get_tableau("rk4"), Stepping(steps=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(TypeError, match="ts is on"):
        odeint(linear_field, torch.ones(1, 2, dtype=F64, device="cuda"), torch.tensor([0.0, 1.0], dtype=F64),
               get_tableau("rk4"), Stepping(steps=2))


def test_device_mismatch_on_meta_device():
    """The same check without a GPU: a tensor on the meta device stands in for another device."""
    with pytest.raises(TypeError, match=r"ts is on meta but y0 is on cpu"):
        odeint(linear_field, torch.ones(1, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64, device="meta"),
               get_tableau("rk4"), Stepping(steps=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=4, step_size=0.1), "either steps= or step_size="),
        (dict(steps=4, rtol=1e-3), "fixed steps but rtol/atol"),
        (dict(steps=0), "positive integer"),
        (dict(step_size=-0.1), "positive finite"),
        (dict(rtol=0.0, atol=0.0), "both zero"),
        (dict(rtol=1e-3, atol=1e-6, max_steps=0), "max_steps must be"),
    ],
)
def test_stepping_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Stepping.of(**kwargs)


def test_adaptive_needs_an_error_estimate():
    with pytest.raises(ValueError, match=r"'rk4' has no embedded error estimate.*bosh3, dopri5, heun, tsit5"):
        Stepping.of().check(get_tableau("rk4"))


def test_tsit5_matches_torchdiffeq_solution_at_tight_tolerance():
    """torchdiffeq has no tsit5: both solve the same ODE, so compare with its dopri5."""
    field = MLPField().double()
    y0 = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    ts = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    with torch.no_grad():
        ours, _, _ = odeint(field, y0, ts, get_tableau("tsit5"), Stepping.of(rtol=1e-11, atol=1e-11))
        ref = torchdiffeq.odeint(field, y0, ts, method="dopri5", rtol=1e-11, atol=1e-11)
    assert (ours - ref).abs().max().item() < 1e-9


@pytest.mark.parametrize("value, norm", [(0.0, 0.0), (2.0, 2.0), (float("inf"), float("inf")),
                                         (float("nan"), float("nan"))])
def test_rms_norm_keeps_nan_and_inf_and_has_a_zero_gradient_at_zero(value, norm):
    """A NaN error must stay NaN (the step is rejected, never accepted as 0); at 0 the gradient is 0."""
    from nde_zoo.solvers.stepping import rms_norm

    x = torch.full((3,), value, dtype=F64, requires_grad=True)
    result = rms_norm(x)
    assert (math.isnan(float(result)) and math.isnan(norm)) or float(result) == norm
    if value == 0.0:
        result.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
    if value == 2.0:
        assert torch.autograd.gradcheck(rms_norm, (torch.randn(5, dtype=F64, requires_grad=True),))
