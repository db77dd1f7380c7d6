"""Fields as users write them under ``compile=True``. Functions (closures, lambdas): what does not compile
falls back to eager with a warning naming the construct, its line and the fix (never a crash), and
the gradients stay eager's. Also: a module field that reads its weight as ``.T`` is traced, and the
log names the compile error that made it so (not a side effect it does not have); a BatchNorm in
training mode (running statistics changed in place) is named with its fix; the CNF's own velocities
compile as written.

The programs compile with ``aot_eager`` (Dynamo and AOTAutograd, no Inductor): what falls back, and
why, is decided before any backend runs.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nde_zoo.driver.programs import BACKEND_ENV
from nde_zoo.models.cnf import CNFField, ConcatSquashVelocity, MLPVelocity
from nde_zoo.strategies import Direct

F64 = torch.float64
_W = nn.Parameter(torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.3)
_NET = nn.Linear(3, 3).double()
_CALLS = [0]


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")


def reads_transposed(t, y):
    return torch.tanh(y @ _W.T)


def reads_item(t, y):
    largest = y.abs().max().item()
    return torch.tanh(_NET(y)) / (1.0 + largest)


def branches(t, y):
    if y.abs().sum() > 1e9:
        return -y
    return torch.tanh(_NET(y))


def calls_numpy(t, y):
    return torch.tanh(_NET(y)) * float(np.tanh(y.detach().numpy()).mean())


def counts(t, y):
    _CALLS[0] += 1
    return torch.tanh(_NET(y))


def prints(t, y):
    print("field evaluated")
    return torch.tanh(_NET(y))


CASES = [  # (field, what the warning names, a piece of the line it points at, a piece of the fix)
    (reads_transposed, "transposed with `.T` or `.mT`", "return torch.tanh(y @ _W.T)", "W.t()"),
    (reads_item, "`.item()` reads a tensor's value into Python", "largest = y.abs().max().item()", "keep the value"),
    (branches, "a branch on a tensor's value", "if y.abs().sum() > 1e9:", "torch.where"),
    (calls_numpy, "a NumPy call on a tensor", "np.tanh(y.detach().numpy())", "torch function"),
    (counts, "changes Python state on each call", "_CALLS[0] += 1", "nfe_forward"),
    (prints, "a print() call", 'print("field evaluated")', "drop it"),
]


def _line_of(field, piece: str) -> int:
    source, first = inspect.getsourcelines(field)
    return first + next(i for i, text in enumerate(source) if piece in text)


@pytest.mark.parametrize("field, construct, line, fix", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_function_field_that_cannot_compile_falls_back_naming_the_construct_its_line_and_the_fix(
        aot_eager, field, construct, line, fix, capsys):
    y0, ts = torch.randn(2, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    strategy = Direct("midpoint", steps=4, compile=True)  # differentiated through its loop: nothing compiles
    with pytest.warns(RuntimeWarning) as record:
        sol = strategy.solve(field, y0, ts)
    message = " ".join(str(w.message) for w in record if "could not compile" in str(w.message))
    where = f"test_compiled_user_fields.py:{_line_of(field, line)}"
    assert construct in message and where in message and line in message, message
    assert "Fix: " in message and fix in message.split("Fix: ", 1)[1], message
    assert strategy.programs.compiles == 0 and strategy.programs.fallbacks
    eager = Direct("midpoint", steps=4).solve(field, y0, ts)
    assert torch.allclose(sol.ys, eager.ys, rtol=1e-12, atol=0)


def test_strict_raises_a_clear_error_for_a_function_field(aot_eager):
    with pytest.raises(RuntimeError, match=r"compile='strict'.*could not compile.*\.item\(\)"):
        Direct("midpoint", steps=4, compile="strict").solve(
            reads_item, torch.randn(2, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64))


def test_a_function_field_written_with_t_compiles_with_the_eager_gradient(aot_eager):
    """The fix the warning names works: ``W.t()`` instead of ``W.T``."""
    def field(t, y):
        return torch.tanh(y @ _W.t())

    y0, ts = torch.randn(2, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    grads = []
    for compile in (False, "strict"):
        _W.grad = None
        strategy = Direct("midpoint", steps=4, compile=compile)
        strategy.solve(field, y0, ts).ys.pow(2).sum().backward()
        grads.append(_W.grad.clone())
    assert strategy.programs.compiles == 1
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


class _Transposes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 3, dtype=F64) * 0.3)

    def forward(self, t, y):
        return torch.tanh(y @ self.W.T)


def test_a_module_field_reading_its_weight_transposed_is_traced_and_the_log_says_why(aot_eager, caplog):
    field = _Transposes()
    y0, ts = torch.randn(2, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    strategy = Direct("midpoint", steps=4, compile="strict")
    with caplog.at_level("INFO", logger="nde_zoo"):
        compiled = strategy.solve(field, y0, ts).ys
    traced = [r.getMessage() for r in caplog.records if "traced into a graph" in r.getMessage()]
    assert len(traced) == 1 and "did not compile as written" in traced[0] and "aliasing" in traced[0], traced
    assert "changes Python state" not in traced[0]
    torch.testing.assert_close(compiled, Direct("midpoint", steps=4).solve(field, y0, ts).ys, rtol=1e-12, atol=0)


@pytest.mark.parametrize("velocity", [ConcatSquashVelocity, MLPVelocity])
def test_the_cnf_velocities_compile_as_written(aot_eager, velocity, caplog):
    """No failed first compile before a trace: the CNF's products use ``F.linear``, not ``weight.T``."""
    field = CNFField(2, width=8, depth=1, velocity=velocity(2, 8, 1)).double()
    y0 = torch.cat([torch.randn(5, 2, dtype=F64), torch.zeros(5, 1, dtype=F64)], dim=1)
    with caplog.at_level("INFO", logger="nde_zoo"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        strategy = Direct("euler", steps=1, compile="strict")
        strategy.solve(field, y0, torch.tensor([0.0, 1.0], dtype=F64))
    assert not strategy.programs._traced
    assert not [r for r in caplog.records if "traced into a graph" in r.getMessage()]


class _Normalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.norm = nn.BatchNorm1d(3).double()

    def forward(self, t, y):
        return torch.tanh(self.norm(self.lin(y)))


def test_a_batchnorm_in_training_mode_falls_back_naming_it_and_compiles_in_eval_mode(aot_eager):
    field = _Normalised()
    y0, ts = torch.randn(4, 3, dtype=F64), torch.linspace(0.0, 1.0, 3, dtype=F64)
    with pytest.warns(RuntimeWarning) as record:
        Direct("midpoint", steps=2, compile=True).solve(field, y0, ts)
    message = " ".join(str(w.message) for w in record if "could not compile" in str(w.message))
    assert "BatchNorm in training mode" in message and "eval mode" in message, message
    field.eval()  # running statistics: nothing changes in place
    strategy = Direct("midpoint", steps=2, compile="strict")
    compiled = strategy.solve(field, y0, ts).ys
    assert strategy.programs.compiles == 1
    torch.testing.assert_close(compiled, Direct("midpoint", steps=2).solve(field, y0, ts).ys, rtol=1e-12, atol=0)
