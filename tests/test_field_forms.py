"""Fields written the ways users write them lose no gradient under any strategy.

A strategy with its own backward pass (and torchdiffeq's adjoint) differentiates only the
tensors it is given; a field written as a closure used to give it none, and the parameter
gradients vanished without a word. Every form below must give the gradients of the same
strategy on the same field written as an ``nn.Module`` (which the exactness tests hold equal
to Direct's), or be refused at the solve with an error that names the fix.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from nde_zoo.solvers import NonFiniteStateError
from nde_zoo.strategies import Adjoint, Checkpoint, Direct, LocalERNODE, Reversible, Seminorm, Symplectic
from nde_zoo.driver.autograd import NonDeterministicFieldError
from nde_zoo.driver.fields import FieldDependencyError, field_parameters, inspect_field

F64 = torch.float64
TS = torch.linspace(0.0, 1.0, 3, dtype=F64)
STEPPING = dict(solver="midpoint", steps=6)
STRATEGIES = {
    "direct": lambda: Direct(**STEPPING),
    "checkpoint": lambda: Checkpoint(**STEPPING),
    "checkpoint_binomial": lambda: Checkpoint(**STEPPING, snapshots=2),
    "reversible": lambda: Reversible(**STEPPING),
    "symplectic": lambda: Symplectic(**STEPPING),
    "adjoint": lambda: Adjoint(**STEPPING),
    "seminorm": lambda: Seminorm(**STEPPING),
    "ernode_checkpoint": lambda: LocalERNODE(inner=Checkpoint(**STEPPING)),
}

#: a module-level network, read by module-level functions as a global (a script's usual field).
GLOBAL_NET: nn.Module | None = None


def global_lambda(t, y):
    return torch.tanh(GLOBAL_NET(y)) * (1 + t)


def _apply(net, t, y):
    return torch.tanh(net(y)) * (1 + t)


class AsModule(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return _apply(self.net, t, y)


class CallableHolder:
    """Not a module: a plain object holding a network, with ``__call__`` and a method."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, t, y):
        return _apply(self.net, t, y)

    def field(self, t, y):
        return _apply(self.net, t, y)


def _forms(net: nn.Module) -> dict:
    def nested(t, y):
        return _apply(net, t, y)

    return {
        "lambda": lambda t, y: torch.tanh(net(y)) * (1 + t),
        "nested_function": nested,
        "partial": functools.partial(_apply, net),
        "bound_method_of_module": AsModule(net).forward,
        "bound_method_of_object": CallableHolder(net).field,
        "callable_object": CallableHolder(net),
        "global_function": global_lambda,
    }


FORMS = sorted(_forms(nn.Linear(1, 1)))


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 3).double()


def _gradients(strategy_name, field, net, y0_requires_grad, **solve_kwargs):
    torch.manual_seed(1)
    y0 = torch.randn(4, 3, dtype=F64).requires_grad_(y0_requires_grad)
    net.zero_grad()
    weights = torch.linspace(-1, 1, 3 * 4 * 3, dtype=F64).reshape(3, 4, 3)
    ys = STRATEGIES[strategy_name]().solve(field, y0, TS, **solve_kwargs).ys
    assert ys.requires_grad, "the solution does not depend on the field's parameters"
    (ys * weights).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    if y0_requires_grad:
        grads.append(y0.grad.clone())
    return grads


@pytest.mark.parametrize("y0_requires_grad", [False, True], ids=["y0_data", "y0_grad"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("strategy_name", sorted(STRATEGIES))
def test_every_field_form_gets_the_module_forms_gradients(strategy_name, form, y0_requires_grad):
    global GLOBAL_NET
    net = GLOBAL_NET = _network()
    reference = _gradients(strategy_name, AsModule(net), net, y0_requires_grad)
    assert all(float(g.abs().max()) > 0 for g in reference)
    got = _gradients(strategy_name, _forms(net)[form], net, y0_requires_grad)
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    if strategy_name in ("checkpoint", "symplectic"):  # exact strategies: Direct's gradients too
        direct = _gradients("direct", _forms(net)[form], net, y0_requires_grad)
        for g, r in zip(got, direct, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy_name", sorted(STRATEGIES))
@pytest.mark.parametrize("y0_requires_grad", [False, True], ids=["y0_data", "y0_grad"])
def test_a_plain_function_without_parameters_still_works(strategy_name, y0_requires_grad):
    def decay(t, y):
        return -y * (1 + t)

    y0 = torch.ones(2, 3, dtype=F64).requires_grad_(y0_requires_grad)
    ys = STRATEGIES[strategy_name]().solve(decay, y0, TS).ys
    assert ys.requires_grad == y0_requires_grad
    if y0_requires_grad:
        ys.sum().backward()
        assert y0.grad is not None and float(y0.grad.abs().min()) > 0


@pytest.mark.parametrize("strategy_name", sorted(STRATEGIES))
def test_params_argument_names_what_no_search_can_see(strategy_name):
    """A field that reaches its network through a registry looked up by a string: the static
    search cannot see it; ``params=`` names it (the graph walk would find it as well)."""
    net = _network()
    registry = {"net": net}
    name = "net"
    field = lambda t, y: _apply(registry[name], t, y)  # noqa: E731
    reference = _gradients(strategy_name, AsModule(net), net, False)
    got = _gradients(strategy_name, field, net, False, params=list(net.parameters()))
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_a_module_field_that_reads_another_modules_parameters_loses_nothing():
    """A module's ``forward`` reading a second network that is not its submodule (a global)."""
    outer = _network()

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, t, y):
            return torch.tanh(self.lin(y)) + outer(y)

    field = Reads()
    y0 = torch.randn(4, 3, dtype=F64)
    grads = {}
    for name in ("direct", "checkpoint", "symplectic", "adjoint"):
        outer.zero_grad()
        STRATEGIES[name]().solve(field, y0, TS).ys.square().sum().backward()
        grads[name] = outer.weight.grad.clone()
    for name in ("checkpoint", "symplectic"):
        torch.testing.assert_close(grads[name], grads["direct"], rtol=1e-10, atol=1e-12)
    # the continuous adjoint differs from the discretisation's gradient by its own error (0.4% here)
    torch.testing.assert_close(grads["adjoint"], grads["direct"], rtol=2e-2, atol=1e-3)


def test_static_search_finds_the_parameters_of_each_form():
    net = _network()
    expected = {id(p) for p in net.parameters()}
    for form, field in _forms(net).items():
        if form == "global_function":
            global GLOBAL_NET
            GLOBAL_NET = net
        assert {id(p) for p in field_parameters(field)} == expected, form
    assert field_parameters(lambda t, y: -y) == []


@pytest.mark.parametrize("strategy_name", sorted(set(STRATEGIES) - {"direct"}))
def test_a_tensor_computed_outside_the_field_is_refused_at_the_solve(strategy_name):
    net = _network()
    weight = net.weight * 2  # computed from a parameter, outside the field
    field = lambda t, y: torch.tanh(y @ weight.T)  # noqa: E731
    with pytest.raises(FieldDependencyError, match="computed outside it.*Compute the tensor inside the field"):
        STRATEGIES[strategy_name]().solve(field, torch.randn(4, 3, dtype=F64), TS)


def test_direct_differentiates_a_tensor_computed_outside_the_field():
    net = _network()
    weight = net.weight * 2
    field = lambda t, y: torch.tanh(y @ weight.T)  # noqa: E731
    Direct(**STEPPING).solve(field, torch.randn(4, 3, dtype=F64), TS).ys.sum().backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().max()) > 0


# -- the probe runs on every solve: what a field reads can change between solves -------------------

#: a leaf tensor a module's ``forward`` reads as a global (rebound between solves below).
SCALE: torch.Tensor | None = None


class Counted(nn.Module):
    """A module field that records its calls, reads ``SCALE`` when set and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.context = torch.zeros(3, dtype=F64)  # a plain attribute: set per batch by its user
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        out = torch.tanh(self.lin(y) + self.context)
        return out * SCALE if SCALE is not None else out


def _calls_of_one_solve(strategy, field, y0):
    before = field.calls
    strategy.solve(field, y0, TS).ys.square().sum().backward()
    return field.calls - before


@pytest.mark.parametrize("compile", [False, True])
def test_a_context_that_starts_requiring_grad_between_solves_is_refused(compile, monkeypatch):
    """A module field trained for a while with a context that needs no gradient (an encoder still
    frozen), then given one computed from trainable parameters: the next solve refuses it, as the
    first would have, rather than dropping the encoder's gradient."""
    monkeypatch.setenv("NDE_ZOO_COMPILE_BACKEND", "aot_eager")
    field, y0 = Counted(), torch.randn(4, 3, dtype=F64)
    strategy = Checkpoint(**STEPPING, compile=compile)
    encoder = nn.Linear(3, 3).double().requires_grad_(False)
    for _ in range(2):
        field.context = encoder(y0.mean(0))
        _calls_of_one_solve(strategy, field, y0)
    encoder.requires_grad_(True)  # unfrozen
    field.context = encoder(y0.mean(0))
    with pytest.raises(FieldDependencyError, match="computed outside it"):
        strategy.solve(field, y0, TS)


def test_a_module_reading_a_global_tensor_gets_the_gradient_of_what_it_holds_at_each_solve():
    global SCALE
    field, y0, strategy = Counted(), torch.randn(4, 3, dtype=F64), Checkpoint(**STEPPING)
    try:
        SCALE = torch.tensor(1.5, dtype=F64, requires_grad=True)
        first = _calls_of_one_solve(strategy, field, y0)
        assert SCALE.grad is not None
        SCALE = torch.tensor(0.5, dtype=F64, requires_grad=True)
        assert _calls_of_one_solve(strategy, field, y0) == first
        got = SCALE.grad.clone()
        SCALE.grad = None
        Direct(**STEPPING).solve(field, y0, TS).ys.square().sum().backward()
        torch.testing.assert_close(got, SCALE.grad, rtol=1e-10, atol=1e-12)
    finally:
        SCALE = None


# -- non-finite input is named as such, not as a non-deterministic field ----------------------------

NAN_STRATEGIES = sorted(STRATEGIES)


@pytest.mark.parametrize("strategy_name", NAN_STRATEGIES)
def test_a_nan_in_y0_is_named_as_bad_input(strategy_name):
    field = AsModule(_network())
    y0 = torch.randn(5, 3, dtype=F64)
    y0[2, 1] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"initial state y0 .* in 1 of 5 batch entries \(first: index 2\)"):
        STRATEGIES[strategy_name]().solve(field, y0, TS)


@pytest.mark.parametrize("strategy_name", NAN_STRATEGIES)
def test_a_field_returning_nan_at_a_finite_state_is_named_as_the_fields(strategy_name):
    net = _network()
    with torch.no_grad():
        net.bias[0] = float("nan")
    with pytest.raises(NonFiniteStateError, match="vector field returned NaN or infinity"):
        STRATEGIES[strategy_name]().solve(AsModule(net), torch.randn(4, 3, dtype=F64), TS)


def test_a_field_that_turns_nan_midway_is_named_as_the_fields():
    """Finite at ``y0``, NaN once the state has moved: blamed on the field, found at the last finite output."""
    net = _network()

    def field(t, y):
        out = _apply(net, t, y)
        return torch.where(t > 0.45, out * float("nan"), out)  # finite up to the output at t=0.5

    with pytest.raises(NonFiniteStateError, match="vector field returned NaN or infinity at t=0.5"):
        Direct(**STEPPING).solve(field, torch.randn(4, 3, dtype=F64), TS)


def test_nan_is_never_called_non_determinism():
    net = _network()
    y0 = torch.randn(3, 3, dtype=F64)
    y0[0, 0] = float("nan")
    with pytest.raises(NonFiniteStateError):
        inspect_field(AsModule(net), TS[0], y0, "checkpoint")
    noisy = lambda t, y: net(y) + torch.randn_like(y)  # noqa: E731
    with pytest.raises(NonDeterministicFieldError, match="two evaluations"):
        inspect_field(noisy, TS[0], torch.randn(3, 3, dtype=F64), "checkpoint")


@pytest.mark.parametrize("form", ["lambda", "partial"])
def test_auto_delegates_a_closure_field_without_losing_its_gradients(form):
    """``strategy=auto`` probes and then delegates to the strategy it chose: that one finds the
    closure's parameters like any other (its gradient equals the chosen strategy's on the module)."""
    from nde_zoo.strategies import Auto

    net = _network()
    y0 = torch.randn(4, 3, dtype=F64)
    auto = Auto("midpoint", steps=6, memory_budget="1GB")
    auto.solve(_forms(net)[form], y0, TS).ys.square().sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    assert all(float(g.abs().max()) > 0 for g in got)
    net.zero_grad()
    auto.chosen.solve(AsModule(net), y0, TS).ys.square().sum().backward()
    for g, p in zip(got, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
