"""Nothing a strategy records grows with the number of solves.

A strategy is a Lightning callback that logs each training step's NFE and memory. It used to
append every ``Solution`` (with its autograd graph) to a list that only the training-batch
hooks cleared, so plain-PyTorch loops, ``test`` and ``predict`` grew without bound. Now it
records lightweight figures only while a training batch is under way.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref
from types import SimpleNamespace

import lightning
import pytest
import torch
from torch import nn

from nde_zoo.datamodules import DigitsDataModule
from nde_zoo.models import ODEClassifier
from nde_zoo.strategies import (
    Adjoint,
    Checkpoint,
    Direct,
    LocalERNODE,
    Reversible,
    Seminorm,
    Symplectic,
    base,
)
from nde_zoo.strategies.base import Solution
from nde_zoo.strategies.sde import brownian


class Field(nn.Module):
    def __init__(self, dim: int = 4, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


class ToySDE(nn.Module):
    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def f(self, t, y):
        return torch.tanh(self.a(y))

    def g(self, t, y):
        return 0.3 * torch.sigmoid(self.b(y))


STRATEGIES = {
    "direct": lambda: Direct("rk4", steps=4),
    "direct_adaptive": lambda: Direct("dopri5"),
    "checkpoint": lambda: Checkpoint("rk4", steps=8, snapshots=2),
    "symplectic": lambda: Symplectic("dopri5"),
    "reversible": lambda: Reversible("rk4", steps=4),
    "adjoint": lambda: Adjoint("dopri5"),
    "seminorm": lambda: Seminorm("dopri5"),
    "ernode": lambda: LocalERNODE(inner=Direct("rk4", steps=4)),
}


def _containers(strategy) -> dict[str, int]:
    """The sizes of every list/dict/deque attribute of a strategy and of its inner strategy."""
    sizes = {}
    owners = [("", strategy)] + ([("inner.", strategy.inner)] if hasattr(strategy, "inner") else [])
    for owner, obj in owners:
        for name, value in vars(obj).items():
            if isinstance(value, (list, dict, set, tuple)) or hasattr(value, "maxlen"):
                sizes[owner + name] = len(value)
    return sizes


def _live_solutions() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Solution)


@pytest.fixture
def frozen_heap():
    """What is alive before the test moves to gc's permanent generation for the test (``gc.freeze``):
    ``gc.collect`` and ``gc.get_objects`` then see only what the test made (two full collections over a
    worker's heap took 1-2 s a test). A Solution the test makes and leaks is among those, and counted;
    the objects frozen are not collected until ``gc.unfreeze`` at the test's end."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_plain_python_solves_keep_nothing(frozen_heap, name, grad):
    """Solves outside a Trainer (with or without backward, with or without a graph) leave nothing behind."""
    torch.manual_seed(0)
    strategy, field = STRATEGIES[name](), Field()
    ts = torch.tensor([0.0, 0.5, 1.0])
    before = _live_solutions()
    refs, sizes = [], []
    with torch.set_grad_enabled(grad):
        for i in range(30):
            y0 = torch.randn(8, 4, requires_grad=grad)
            solution = strategy.solve(field, y0, ts)
            loss = solution.ys.square().mean() + strategy.regularisation(solution)
            if grad and i % 2:
                loss.backward()
            refs.append(weakref.ref(solution.ys))
            del solution, loss, y0
            sizes.append(_containers(strategy))
    assert _live_solutions() == before, "a strategy keeps Solution objects after the caller dropped them"
    assert not any(r() is not None for r in refs), "a solution's ys (and its graph) outlive the caller"
    assert sizes[-1] == sizes[0], f"a per-call list or dict grows: {sizes[0]} -> {sizes[-1]}"
    assert not strategy._solutions


@pytest.mark.parametrize("make", [Direct, Adjoint, Reversible], ids=["direct", "adjoint", "reversible"])
def test_plain_python_sde_solves_keep_nothing(make):
    pytest.importorskip("torchsde")
    torch.manual_seed(0)
    strategy, sde = make(steps=8), ToySDE()
    ts = torch.tensor([0.0, 1.0])
    refs = []
    for _ in range(10):
        y0 = torch.randn(6, 4, requires_grad=True)
        solution = strategy.solve_sde(sde, y0, ts, brownian(0.0, 1.0, y0, 1))
        solution.ys[-1].sum().backward()
        refs.append(weakref.ref(solution.ys))
        del solution, y0
    gc.collect()
    assert not any(r() is not None for r in refs) and not strategy._solutions


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return lightning.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("make", "nfe"),
    [(lambda: Direct("rk4", steps=4), 16.0), (lambda: Reversible("rk4", steps=4), 32.0)],
    ids=["direct", "reversible"],
)
def test_training_figures_unchanged_and_test_predict_keep_nothing(make, nfe):
    """The per-step figures are still logged in training; ``test``/``predict`` keep no solutions."""
    lightning.seed_everything(0)
    strategy = make()
    model = ODEClassifier(strategy, state_dim=8, width=16)
    dm = DigitsDataModule(batch_size=64)
    trainer = _trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(model, dm)
    assert [h["step"] for h in strategy.history] == [1.0, 2.0, 3.0]
    last = strategy.history[-1]
    assert last["nfe/forward"] == nfe  # rk4, 4 steps: one solve per training step (Y and Z if reversible)
    assert trainer.logged_metrics["nfe/forward"] == nfe and last["memory/saved_bytes"] > 0
    if isinstance(strategy, Reversible):  # what backward fills in later still reaches the log
        assert last["nfe/backward"] > 0 and "reversible/reconstruction_error" in trainer.logged_metrics
    assert not strategy._solutions

    seen = []

    class Spy(lightning.Callback):
        def on_test_batch_end(self, *args, **kwargs):
            seen.append(len(strategy._solutions))

        on_predict_batch_end = on_test_batch_end

    _trainer(limit_test_batches=3, callbacks=[Spy()]).test(model, dm, verbose=False)
    _trainer(limit_predict_batches=3, callbacks=[Spy()]).predict(model, dm.test_dataloader())
    assert seen == [0] * 6 and not strategy._solutions


def test_a_training_step_that_fails_leaves_recording_off():
    """An exception inside a training step must not leave the strategy recording what follows."""
    strategy = Direct("rk4", steps=2)

    class Failing(ODEClassifier):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            raise RuntimeError("boom")

    model = Failing(strategy, state_dim=8, width=16)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(max_steps=1, num_sanity_val_steps=0).fit(model, DigitsDataModule(batch_size=32))
    strategy.solve(Field(8), torch.randn(3, 8), torch.tensor([0.0, 1.0]))
    assert not strategy._solutions


def test_history_is_thinned_beyond_its_limit(monkeypatch):
    """``history`` (one entry per training step, for the NFE plot) stays bounded and evenly spaced."""
    monkeypatch.setattr(base, "MAX_HISTORY", 16)
    strategy = Direct("rk4", steps=2)
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda *a, **k: None)
    field, ts = Field(), torch.tensor([0.0, 1.0])
    for step in range(1, 201):
        strategy.on_train_batch_start(None, module, None, step)
        strategy.solve(field, torch.randn(2, 4), ts)
        strategy.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step)
    steps = [int(h["step"]) for h in strategy.history]
    assert len(steps) <= 16
    assert len({b - a for a, b in zip(steps, steps[1:], strict=False)}) == 1 and steps[-1] > 180


def test_too_many_solves_in_one_step_warn(monkeypatch):
    # the cap made small, as MAX_HISTORY is above: the same cap and warning after 55 solves, not 10,005
    monkeypatch.setattr(base, "MAX_RECORDS_PER_STEP", 50)
    strategy = Direct("euler", steps=1)
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda *a, **k: None)
    strategy.on_train_batch_start(None, module, None, 0)
    field, ts, y0 = Field(), torch.tensor([0.0, 1.0]), torch.randn(1, 4)
    with pytest.warns(UserWarning, match="count only the first"):
        for _ in range(base.MAX_RECORDS_PER_STEP + 5):
            strategy._record(Solution(y0, ts, strategy.solve(field, y0, ts).stats))
    assert len(strategy._solutions) == base.MAX_RECORDS_PER_STEP + 1


_RSS_PROBE = textwrap.dedent(
    """
    import json, os, sys, torch
    from torch import nn
    from nde_zoo.strategies import Direct

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) * 1024

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))

        def forward(self, t, y):
            return self.net(y)

    field, strategy, ts = Field(), Direct("rk4", steps=4), torch.tensor([0.0, 0.5, 1.0])
    y0 = torch.randn(64, 16)

    def solve(i):
        if i % 3 == 2:
            with torch.no_grad():
                return strategy.solve(field, y0, ts).ys.sum()
        ys = strategy.solve(field, y0, ts).ys   # ~0.6 MB of graph per solve
        if i % 3 == 1:
            ys.square().mean().backward()
        return ys.sum().item()

    for i in range(100):
        solve(i)
    start, done = rss(), 0
    for i in range(2000):
        solve(i)
        done = i + 1
        if rss() - start > 256 * 2**20:   # clearly growing: stop before eating the machine
            break
    print(json.dumps({"growth": rss() - start, "solves": done}), flush=True)
    os._exit(0)  # measured: skip the interpreter's teardown (1-2 s)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_2000_plain_python_solves_keep_rss_flat(tmp_path):
    """Resident memory of a fresh process stays flat over 2000 solves (the old code grew ~0.6 MB each)."""
    script = tmp_path / "probe.py"
    script.write_text(_RSS_PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # 32 MiB: 2000 solves leaking even 17 kB each would exceed it; allocator noise stays far below.
    assert result["solves"] == 2000 and result["growth"] < 32 * 2**20, result
