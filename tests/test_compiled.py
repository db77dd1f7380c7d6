"""Compiled solves (``compile=``): equal to eager to round-off, bounded recompiles, clear fall-backs.

The wide matrix runs on the ``aot_eager`` backend (the same dynamo tracing, scans,
functionalisation and ``torch.func`` transforms as Inductor, but seconds to compile); one
case per strategy runs through Inductor itself, together covering every solver.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn

from nde_zoo.strategies import Adjoint, Checkpoint, Direct, LocalERNODE, Reversible, Seminorm, Symplectic
from nde_zoo.driver.programs import BACKEND_ENV, CompileSpec
from tests.test_reversible import MLP as ReferenceMLP

F64 = torch.float64
STRATEGIES = {"direct": Direct, "checkpoint": Checkpoint, "reversible": Reversible, "symplectic": Symplectic}
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")


MLP = functools.partial(ReferenceMLP, width=8)  # the other strategy tests' field, narrower


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")


def gradients(strategy, field, y0, ts, weights):
    y0 = y0.clone().requires_grad_()
    sol = strategy.solve(field, y0, ts)
    loss = (sol.ys * weights).sum() + sol.ys.pow(2).sum()  # a cotangent at every output time
    grads = torch.autograd.grad(loss, [y0, *field.parameters()])
    return sol, [g.detach() for g in grads]


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def kwargs_for(name):
    return {"snapshots": 3} if name == "checkpoint" else {}


# Output layouts: irregular times (gathered from every step), uniform segments (nested scans,
# memory flat in N), every step an output.
LAYOUTS = {
    "irregular": (torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=F64), 10),
    "uniform": (torch.linspace(0.0, 1.0, 5, dtype=F64), 8),
    "dense": (torch.linspace(0.0, 1.0, 7, dtype=F64), 6),
}


def compare(name, solver, ts, steps, tolerance=1e-12):
    field = MLP().double()
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(len(ts), 4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    cls = STRATEGIES[name]
    eager_sol, eager = gradients(cls(solver, steps=steps, **kwargs_for(name)), field, y0, ts, weights)
    strategy = cls(solver, steps=steps, compile="strict", **kwargs_for(name))
    compiled_sol, compiled = gradients(strategy, field, y0, ts, weights)
    assert strategy.programs.compiles >= 1  # it really ran compiled
    assert relative(compiled_sol.ys.detach(), eager_sol.ys.detach()) <= tolerance
    for c, e in zip(compiled, eager):
        assert relative(c, e) <= tolerance
    assert compiled_sol.stats.nfe_forward == eager_sol.stats.nfe_forward
    assert compiled_sol.path.output_steps == eager_sol.path.output_steps
    return strategy, compiled_sol


# Every strategy x solver; the layouts rotate so each strategy and each solver meets all three.
MATRIX = [
    (name, solver, sorted(LAYOUTS)[(i + j) % len(LAYOUTS)])
    for i, name in enumerate(sorted(STRATEGIES))
    for j, solver in enumerate(SOLVERS)
]


@pytest.mark.parametrize("name, solver, layout", MATRIX)
def test_compiled_equals_eager(aot_eager, name, solver, layout):
    ts, steps = LAYOUTS[layout]
    compare(name, solver, ts, steps)


@pytest.mark.parametrize("name, solver", [
    ("direct", "rk4"),
    ("reversible", "midpoint"),
    # a minute of compiling each on 2 cores: outside CI's budget, run with -m manual (make test-all)
    pytest.param("checkpoint", "euler", marks=[pytest.mark.manual, pytest.mark.slow]),
    pytest.param("symplectic", "dopri5", marks=[pytest.mark.manual, pytest.mark.slow]),
])
def test_inductor_equals_eager(monkeypatch, name, solver):
    """Inductor's generated code (C++ wrapper), one strategy per solver (every solver covered once)."""
    monkeypatch.setenv(BACKEND_ENV, "inductor")
    ts, steps = LAYOUTS["irregular"]
    compare(name, solver, ts, steps)


def test_compiled_reversible_equals_backprop_through_its_recursion(aot_eager):
    from tests.test_reversible import reference_solve

    from nde_zoo.solvers import Stepping

    field = MLP().double()
    y0 = torch.randn(4, 3, dtype=F64).requires_grad_()
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    ys_ref, _ = reference_solve(field, y0, ts, "rk4", Stepping.of(steps=20), 0.999)
    reference = torch.autograd.grad(ys_ref.pow(2).sum(), [y0, *field.parameters()])
    ys = Reversible("rk4", steps=20, compile="strict").solve(field, y0, ts).ys
    compiled = torch.autograd.grad(ys.pow(2).sum(), [y0, *field.parameters()])
    for c, r in zip(compiled, reference):
        assert relative(c, r) <= 1e-10


def test_compiled_reversible_memory_is_flat_in_steps(aot_eager):
    field = MLP().double()
    y0 = torch.randn(16, 3, dtype=F64).requires_grad_()
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    saved = {}
    for steps in (10, 1000):
        strategy = Reversible("midpoint", steps=steps, compile="strict")
        sol = strategy.solve(field, y0, ts)
        sol.ys.sum().backward()
        assert strategy.programs.compiles == 2  # the forward and the backward program
        saved[steps] = sol.saved_bytes
    assert saved[10] > 0
    assert abs(saved[1000] - saved[10]) <= 0.05 * saved[10]


def test_recompiles_are_bounded_with_a_ragged_last_batch(aot_eager):
    """Two epochs of batches 8, 8, 3: the ragged batch runs the batch-8 programs padded, no compile of its own."""
    field = MLP().double()
    strategy = Reversible("rk4", steps=12, compile="strict")
    ts = torch.linspace(0.0, 1.0, 4, dtype=F64)
    torch._dynamo.utils.counters.clear()
    for _epoch in range(2):
        for batch in (8, 8, 3):
            y0 = torch.randn(batch, 3, dtype=F64).requires_grad_()
            strategy.solve(field, y0, ts).ys.sum().backward()
    assert strategy.programs.compiles == 2  # (forward, backward) of batch 8; batch 3 runs them padded
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert strategy.programs.compile_seconds > 0


class _MixesRows(nn.Module):
    """A field whose rows interact (each sees the batch mean): it must not be padded."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()

    def forward(self, t, y):
        return torch.tanh(self.lin(y - y.mean(0, keepdim=True)))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("field_class", [MLP, _MixesRows])
def test_a_ragged_batch_equals_eager_padded_or_not(aot_eager, name, field_class):
    field = field_class().double()
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    strategy = STRATEGIES[name]("midpoint", steps=6, compile="strict", **kwargs_for(name))
    full = torch.randn(8, 3, dtype=F64)
    gradients(strategy, field, full, ts, torch.ones(3, 8, 3, dtype=F64))
    compiles = strategy.programs.compiles
    ragged = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    weights = torch.randn(3, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    compiled_sol, compiled = gradients(strategy, field, ragged, ts, weights)
    eager_sol, eager = gradients(STRATEGIES[name]("midpoint", steps=6, **kwargs_for(name)), field, ragged, ts, weights)
    assert compiled_sol.ys.shape == eager_sol.ys.shape == (3, 3, 3)
    for c, e in zip([compiled_sol.ys.detach(), *compiled], [eager_sol.ys.detach(), *eager]):
        assert relative(c, e) <= 1e-12
    # rows apart: the full batch's programs, padded; rows mixed: compiled for its own shape
    assert strategy.programs.compiles == compiles + (0 if field_class is MLP else compiles)


class BranchyField(nn.Module):
    """Data-dependent Python control flow: a graph break that compilation cannot keep."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2).double()

    def forward(self, t, y):
        if float(y.abs().sum()) > 1e9:  # a host sync deciding the branch
            return -y
        return self.lin(y)


def test_uncompilable_field_falls_back_to_eager_with_one_warning(aot_eager):
    field = BranchyField()
    y0 = torch.randn(3, 2, dtype=F64)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    strategy = Symplectic("rk4", steps=5, compile=True)
    with pytest.warns(RuntimeWarning, match="could not compile its solve and runs it eagerly") as record:
        first = strategy.solve(field, y0, ts).ys
    assert any("symplectic" in str(w.message) for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per reason, not one per solve
        second = strategy.solve(field, y0, ts).ys
    eager = Symplectic("rk4", steps=5).solve(field, y0, ts).ys
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert strategy.programs.compiles == 0 and strategy.programs.fallbacks


def test_strict_raises_instead_of_falling_back(aot_eager):
    strategy = Reversible("rk4", steps=5, compile="strict")
    with pytest.raises(RuntimeError, match="compile='strict'.*could not compile"):
        strategy.solve(BranchyField(), torch.randn(3, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))


@pytest.mark.parametrize("cls", [Adjoint, Seminorm])
def test_torchdiffeq_strategies_refuse_compile(cls):
    with pytest.raises(ValueError, match="no compiled path.*direct, checkpoint, reversible, symplectic"):
        cls("dopri5", compile=True)


def test_compile_argument_is_validated():
    assert CompileSpec.of("true").enabled and CompileSpec.of("strict").strict
    assert CompileSpec.of("reduce-overhead").mode == "reduce-overhead"
    assert not CompileSpec.of(False).enabled
    with pytest.raises(ValueError, match="compile must be one of"):
        Direct("rk4", steps=4, compile="fast")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_adaptive_steps_compile_the_step_and_equal_eager(aot_eager, name):
    """Adaptive solves compile the step (stages and error estimate) and, for a strategy with its own
    backward, each step's reverse; the controller and the reverse loop stay in Python."""
    field = MLP().double()
    y0 = torch.randn(4, 3, dtype=F64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    weights = torch.randn(3, 4, 3, dtype=F64)
    cls = STRATEGIES[name]
    eager_sol, eager = gradients(cls("dopri5", rtol=1e-6, atol=1e-8), field, y0, ts, weights)
    strategy = cls("dopri5", rtol=1e-6, atol=1e-8, compile="strict")
    compiled_sol, compiled = gradients(strategy, field, y0, ts, weights)
    # one step program for every step size; the first step adds one (no reused FSAL stage yet, or
    # the caller's y0 requiring grad), however many steps are taken; one reverse program for all
    reverse = [key for key in strategy.programs._programs if key[0].endswith("/reverse_step")]
    assert len(reverse) == (0 if name == "direct" else 1)
    assert 1 + len(reverse) <= strategy.programs.compiles <= 2 + len(reverse)
    assert compiled_sol.stats.accepted_steps > 2
    assert compiled_sol.path.sizes == eager_sol.path.sizes  # the same accepted steps
    assert compiled_sol.stats.nfe_forward == eager_sol.stats.nfe_forward
    assert compiled_sol.stats.nfe_backward == eager_sol.stats.nfe_backward
    for c, e in zip([compiled_sol.ys.detach(), *compiled], [eager_sol.ys.detach(), *eager]):
        assert relative(c, e) <= 1e-12


def test_direct_on_a_large_state_compiles_each_step_and_equals_eager(aot_eager):
    """From STEP_PROGRAMS_FROM state elements, compiled Direct runs one compiled step program in the
    eager loop (autograd between the steps) instead of a scan whose autograd stacks every residual;
    below it, the scan. Gradients and NFE are eager's either way."""
    from nde_zoo.driver.loop import STEP_PROGRAMS_FROM

    field = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 64)).double()

    def solve_with(batch: int):
        y0 = torch.randn(batch, 64, dtype=F64)
        ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
        weights = torch.randn(3, batch, 64, dtype=F64)
        eager_sol, eager = gradients(Direct("midpoint", steps=6), _AsField(field), y0, ts, weights)
        strategy = Direct("midpoint", steps=6, compile="strict")
        compiled_sol, compiled = gradients(strategy, _AsField(field), y0, ts, weights)
        assert compiled_sol.stats.nfe_forward == eager_sol.stats.nfe_forward == 12
        for c, e in zip([compiled_sol.ys.detach(), *compiled], [eager_sol.ys.detach(), *eager]):
            assert relative(c, e) <= 1e-12
        compiles = strategy.programs.compiles
        with torch.no_grad():  # validation after training: the training programs, no new compile
            validated = strategy.solve(_AsField(field), y0, ts)
        assert strategy.programs.compiles == compiles and not validated.ys.requires_grad
        assert relative(validated.ys, eager_sol.ys.detach()) <= 1e-12
        checked = Direct("midpoint", steps=6, compile="strict")  # a sanity check before any training
        with torch.no_grad():
            checked.solve(_AsField(field), y0, ts)
        gradients(checked, _AsField(field), y0, ts, weights)
        assert checked.programs.compiles == compiles
        return sorted(key[0] for key in strategy.programs._programs)

    large = STEP_PROGRAMS_FROM // 64
    assert solve_with(large) == ["direct/step"]  # one program for every step (the first runs eagerly)
    assert solve_with(large - 1) == ["direct"]  # the whole loop, forward and backward


class _AsField(nn.Module):
    """``net`` as a field ``f(t, y)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


def test_ernode_passes_compile_to_its_inner_strategy(aot_eager):
    strategy = LocalERNODE(inner=Reversible("rk4", steps=8), compile="strict")
    assert strategy.inner.compile.strict
    field = MLP().double()
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    for _ in range(3):  # the sampled time lies on the grid: one program serves every step
        y0 = torch.randn(4, 3, dtype=F64).requires_grad_()
        sol = strategy.solve(field, y0, ts)
        (sol.ys.sum() + strategy.regularisation(sol)).backward()
    assert strategy.inner.programs.compiles == 2
    with pytest.raises(ValueError, match="no compiled path"):
        LocalERNODE(inner=Adjoint("dopri5"), compile=True)


class _VelocityOfYourOwn(nn.Module):
    """A user's velocity without ``forward_and_jvp``: compiled solves take its trace by ``vmap(jacrev)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, t, z):
        return self.net(z) * torch.cos(t)


@pytest.mark.parametrize("velocity", ["built_in", "of_your_own"])
def test_cnf_exact_trace_field_compiles(aot_eager, velocity):
    """Both routes of the exact trace compile and equal eager under Reversible (its own backward
    differentiates the field again, the trace included): the built-in velocity's forward-mode
    trace, and ``vmap(jacrev)`` for a velocity without one."""
    from nde_zoo.models.cnf import CNFField

    own = _VelocityOfYourOwn() if velocity == "of_your_own" else None
    field = CNFField(dim=2, width=16, depth=2, exact_trace_max_dim=8, noise="rademacher", velocity=own).double()
    assert field.takes_trace_by_hand() == (own is None)
    state = torch.cat([torch.randn(5, 2, dtype=F64), torch.zeros(5, 1, dtype=F64)], dim=1)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    weights = torch.randn(2, 5, 3, dtype=F64)
    _, eager = gradients(Reversible("midpoint", steps=6), field, state, ts, weights)
    _, compiled = gradients(Reversible("midpoint", steps=6, compile="strict"), field, state, ts, weights)
    for c, e in zip(compiled, eager):
        assert relative(c, e) <= 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_overhead_on_cuda(monkeypatch):
    """CUDA graphs (mode="reduce-overhead") on fixed steps: equal to eager on the GPU."""
    monkeypatch.setenv(BACKEND_ENV, "inductor")
    field = MLP().double().cuda()
    y0 = torch.randn(4, 3, dtype=F64, device="cuda")
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64, device="cuda")
    weights = torch.randn(3, 4, 3, dtype=F64, device="cuda")
    for name in ("direct", "reversible"):
        cls = STRATEGIES[name]
        _, eager = gradients(cls("rk4", steps=10), field, y0, ts, weights)
        strategy = cls("rk4", steps=10, compile="reduce-overhead")
        for _ in range(3):  # CUDA graphs record on a later call
            _, compiled = gradients(strategy, field, y0, ts, weights)
        for c, e in zip(compiled, eager):
            assert relative(c, e) <= 1e-12


def test_cde_and_latent_ode_fields_compile(aot_eager):
    """The CDE field (a torchcde interpolation evaluated inside; a new field object per batch,
    which reuses the program) and the latent ODE's decoder field compile as they are."""
    from nde_zoo.models import LatentODE, NeuralCDE
    from nde_zoo.models.cde import interpolate

    torch.manual_seed(1)
    cde = NeuralCDE(Direct("rk4", steps=6), in_channels=3, num_classes=2, hidden_dim=4, width=8).double()
    latent = LatentODE(Direct("rk4", steps=6), latent_dim=3, hidden_dim=8, field_width=8, decoder_width=8,
                       encoder_width=8).double()
    strategy = Reversible("rk4", steps=6, compile="strict")
    for batch in range(2):  # the second CDE batch builds a new field: no new program
        x = torch.randn(3, 7, 3, dtype=F64, generator=torch.Generator().manual_seed(batch))
        path = interpolate(x, "hermite")
        field, ts = cde.vector_field(path), path.interval
        y0 = cde.initial(path.evaluate(ts[0])).detach()
        weights = torch.randn(len(ts), *y0.shape, dtype=F64)
        _, eager = gradients(Reversible("rk4", steps=6), field, y0, ts, weights)
        _, compiled = gradients(strategy, field, y0, ts, weights)
        for c, e in zip(compiled, eager):
            assert relative(c, e) <= 1e-12
    assert strategy.programs.compiles == 2  # forward and backward, shared by both batches' fields
    field = latent.vector_field()
    y0 = torch.randn(5, 3, dtype=F64)
    ts = torch.linspace(0.0, 1.0, 4, dtype=F64)
    weights = torch.randn(4, 5, 3, dtype=F64)
    _, eager = gradients(Symplectic("rk4", steps=6), field, y0, ts, weights)
    _, compiled = gradients(Symplectic("rk4", steps=6, compile="strict"), field, y0, ts, weights)
    for c, e in zip(compiled, eager):
        assert relative(c, e) <= 1e-12


@pytest.mark.parametrize("validation_first", [False, True], ids=["after-training", "sanity-check-first"])
@pytest.mark.parametrize("encoded", [False, True], ids=["data-y0", "encoded-y0"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_validation_without_gradients_reuses_the_training_programs(aot_eager, name, encoded, validation_first):
    """``encoded``: in training y0 requires grad (an encoder's output, as in the ODE classifier), in
    validation it does not. ``validation_first``: the pass without gradients comes before any training
    (Lightning's sanity check). Either way training and validation share their programs."""
    field = MLP().double()
    y0, ts = torch.randn(4, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    strategy = STRATEGIES[name]("midpoint", steps=6, compile="strict", **kwargs_for(name))
    trained_y0 = y0.clone().requires_grad_() if encoded else y0
    alone = STRATEGIES[name]("midpoint", steps=6, compile="strict", **kwargs_for(name))
    alone.solve(field, trained_y0, ts).ys.sum().backward()  # what training alone compiles
    if validation_first:
        with torch.no_grad():
            strategy.solve(field, y0, ts)
    strategy.solve(field, trained_y0, ts).ys.sum().backward()  # a training step
    compiles = strategy.programs.compiles
    assert compiles == alone.programs.compiles, "the sanity check compiled a program training does not use"
    with torch.no_grad():
        validation = strategy.solve(field, y0, ts).ys
    assert strategy.programs.compiles == compiles, "a validation pass compiled the loop again"
    assert not validation.requires_grad
    with torch.no_grad():
        eager = STRATEGIES[name]("midpoint", steps=6, **kwargs_for(name)).solve(field, y0, ts).ys
    assert relative(validation, eager) <= 1e-12


class _CountsItsCalls(nn.Module):
    """torchdiffeq's examples' pattern: the field counts its own evaluations (and may print)."""

    def __init__(self, prints: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.nfe = 0
        self.scale = 1.0  # a plain value the output reads: a change must be seen, not replayed
        self.prints = prints

    def forward(self, t, y):
        self.nfe += 1
        if self.prints:
            print("field evaluated")
        return self.scale * torch.tanh(self.lin(y)) * torch.cos(t)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_field_that_counts_its_calls_compiles_and_equals_eager(aot_eager, name, capsys):
    field = _CountsItsCalls(prints=name == "direct")
    y0, ts = torch.randn(2, 3, dtype=F64), torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    weights = torch.randn(3, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    eager_sol, eager = gradients(STRATEGIES[name]("midpoint", steps=6, **kwargs_for(name)), field, y0, ts, weights)
    strategy = STRATEGIES[name]("midpoint", steps=6, compile="strict", **kwargs_for(name))  # no fall-back allowed
    field.nfe = 0
    compiled_sol, compiled = gradients(strategy, field, y0, ts, weights)
    assert strategy.programs.compiles >= 1 and not strategy.programs.fallbacks
    for c, e in zip([compiled_sol.ys.detach(), *compiled], [eager_sol.ys.detach(), *eager]):
        assert relative(c, e) <= 1e-12
    # its side effects ran when it was traced and checked, not at each of the solve's evaluations
    assert compiled_sol.stats.nfe_forward == eager_sol.stats.nfe_forward
    assert 0 < field.nfe < eager_sol.stats.nfe_forward
    # a plain value the field reads changes: it is traced again, not replayed stale
    field.scale = 0.5
    eager_sol, eager = gradients(STRATEGIES[name]("midpoint", steps=6, **kwargs_for(name)), field, y0, ts, weights)
    compiled_sol, compiled = gradients(strategy, field, y0, ts, weights)
    for c, e in zip([compiled_sol.ys.detach(), *compiled], [eager_sol.ys.detach(), *eager]):
        assert relative(c, e) <= 1e-12


class _DependsOnItsCounter(_CountsItsCalls):
    def forward(self, t, y):
        self.nfe += 1
        return torch.tanh(self.lin(y)) / self.nfe  # a compiled loop would replay one value of nfe


class _Branches(_CountsItsCalls):
    def forward(self, t, y):
        if y.abs().sum() > 1e9:
            return -y
        return torch.tanh(self.lin(y))


class _ReadsItem(_CountsItsCalls):
    def forward(self, t, y):
        largest = y.abs().max().item()
        return torch.tanh(self.lin(y)) / (1.0 + largest)


_OUTSIDE = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)


class _ReadsATensorItDoesNotOwn(_CountsItsCalls):
    def forward(self, t, y):
        self.nfe += 1  # a side effect: traced, and the trace meets the tensor
        return _OUTSIDE * torch.tanh(self.lin(y))


class _CallsNumpy(_CountsItsCalls):
    def forward(self, t, y):
        scale = np.tanh(y.detach().numpy()).mean()
        return torch.tanh(self.lin(y)) * float(scale)


@pytest.mark.parametrize("cls, construct, line", [
    (_DependsOnItsCounter, "depends on Python state it changes on each call (it changes nfe)", None),
    (_Branches, "a branch on a tensor's value at test_compiled.py:{}", "if y.abs().sum() > 1e9:"),
    (_ReadsItem, "`.item()` reads a tensor's value into Python at test_compiled.py:{}", "largest = y.abs().max().item()"),
    (_CallsNumpy, "a NumPy call on a tensor at test_compiled.py:{}", "scale = np.tanh(y.detach().numpy()).mean()"),
    (_ReadsATensorItDoesNotOwn, "a tensor _ReadsATensorItDoesNotOwn reads but does not own (not a parameter or "
                                "buffer) at test_compiled.py:{}", "return _OUTSIDE * torch.tanh(self.lin(y))"),
])
def test_a_field_that_cannot_compile_falls_back_naming_the_construct_its_line_and_the_fix(aot_eager, cls, construct,
                                                                                         line):
    field = cls()
    if line is not None:
        source, first = inspect.getsourcelines(cls.forward)
        construct = construct.format(first + next(i for i, text in enumerate(source) if line in text))
    y0, ts = torch.randn(2, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    with pytest.warns(RuntimeWarning) as record:
        sol = Direct("midpoint", steps=4, compile=True).solve(field, y0, ts)
    message = " ".join(str(w.message) for w in record if "could not compile" in str(w.message))
    assert construct in message and "Fix: " in message, message
    if line is not None:
        assert f"(`{line}`)" in message
    eager = Direct("midpoint", steps=4).solve(cls(), y0, ts)  # a fresh field: the counters start alike
    assert sol.ys.shape == eager.ys.shape and torch.isfinite(sol.ys).all()


@pytest.mark.parametrize("name", ["checkpoint", "reversible", "symplectic"])
def test_a_closure_field_compiles_its_forward_and_warns_that_its_backward_is_eager(aot_eager, name):
    net = nn.Linear(3, 3).double()
    field = lambda t, y: torch.tanh(net(y))  # noqa: E731
    y0, ts = torch.randn(2, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    grads = []
    for compile in (False, True):
        net.zero_grad()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            STRATEGIES[name]("midpoint", steps=4, compile=compile, **kwargs_for(name)).solve(
                field, y0, ts).ys.sum().backward()
        grads.append(net.weight.grad.clone())
    assert any("cannot take these, so the backward runs eagerly" in str(w.message) for w in record)
    assert float(grads[0].abs().max()) > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def test_compiling_is_announced_and_timed_in_the_log(aot_eager, caplog):
    """A first call that compiles says so before (it can take minutes) and how long it took after."""
    field = MLP().double()
    y0, ts = torch.randn(2, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    strategy = Direct("midpoint", steps=4, compile=True)
    with caplog.at_level("INFO", logger="nde_zoo"):
        strategy.solve(field, y0, ts)
        strategy.solve(field, y0, ts)  # the same key: no second compile, no second message
    messages = [r.getMessage() for r in caplog.records if r.name == "nde_zoo"]
    before = [m for m in messages if "compiling its direct program" in m]
    after = [m for m in messages if re.search(r"compiled its direct program .* in \d+\.\d s", m)]
    assert len(before) == 1 and len(after) == 1, messages
    assert "(2, 3) float64 cpu" in before[0] and "once per shape" in before[0]
