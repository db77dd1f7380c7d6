"""A ``fit`` killed by a real signal resumes from its ``last.ckpt`` and ends bit for bit where
the uninterrupted run ends (CPU, fixed seeds), with the strategy's own state intact.

Each case runs three ``fit`` runs with the same config: one uninterrupted; one, a ``python -m
nde_zoo fit`` process of its own, that is killed in the middle of epoch 2, after epoch 1 wrote
``last.ckpt`` and after a training step of epoch 2 moved the weights in memory (:class:`BlockAt`
holds the process there and writes a marker, so the kill never races the end of the run); and one
resumed from that ``last.ckpt`` into a new run directory. Only the killed run needs a process (a
signal kills it): the uninterrupted and the resumed runs are the command line run in this process
(the ``cli`` fixture, tests/inprocess.py), the uninterrupted one while the killed process starts,
which saves two interpreter start-ups (5-8 s each) per case. SIGKILL is the hard kill; SIGTERM is Lightning's
graceful stop (it finishes the step it is in and exits without saving).
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from nde_zoo.callbacks import ResumableCheckpoint, ResumableSeeds, derived_seed
from tests.conftest import REPO

EPOCHS, BATCHES, KILL_EPOCH = 4, 3, 2  # killed at epoch 2, batch 1: last.ckpt holds epoch 1's end
COMMON = [
    f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES}", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "seed=0",
    # Rank by the *highest* val/loss: it falls every epoch here, so the "best" checkpoint, which `fit`
    # tests at its end, is one written before the kill, and the resumed run must remember it.
    "callbacks.model_checkpoint.mode=max",
]
CASES = {
    # ERNODE: biased sampling (uses the previous step's times), a schedule still decaying at the kill
    "ernode": ["strategy=ernode", "strategy.sampling=biased", "strategy.decay_steps=10"],
    "reversible": ["strategy=reversible", "strategy.solver=rk4", "strategy.steps=4", "strategy.rtol=null",
                   "strategy.atol=null"],
}
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


class BlockAt(lightning.Callback):
    """Test-only: at ``(epoch, batch)`` write ``marker`` and wait to be killed (SIGTERM lets it go on)."""

    def __init__(self, marker: str, epoch: int, batch: int) -> None:
        self.marker, self.epoch, self.batch = Path(marker), epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        self.marker.with_suffix(".tmp").write_text(str(os.getpid()))
        self.marker.with_suffix(".tmp").rename(self.marker)
        deadline = time.monotonic() + 120
        while not trainer.received_sigterm:
            if time.monotonic() > deadline:
                raise RuntimeError("BlockAt: nobody killed this run")
            time.sleep(0.02)


class DumpStrategyState(lightning.Callback):
    """Test-only: write the gradient strategy's ``state_dict()`` as the resumed run starts training."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save(pl_module.strategy.state_dict(), self.path)


def _fit_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nde_zoo", "fit", *COMMON, f"hydra.run.dir={run_dir}", *extra]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _metrics(run_dir: Path, first_epoch: int = 0) -> dict[str, list[tuple[int, str]]]:
    """``{name: [(epoch, value as logged), ...]}`` of a run's CSV log, from ``first_epoch`` on."""
    out: dict[str, list[tuple[int, str]]] = {}
    for row in csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()):
        for key in ("val/loss", "val/acc", "test/loss", "test/acc"):
            if row.get(key) and int(row["epoch"]) >= first_epoch:
                out.setdefault(key, []).append((int(row["epoch"]), row[key]))
    return out


def _strategy_state(checkpoint: dict) -> dict:
    return {k: v for k, v in checkpoint["callbacks"].items() if k.startswith("GradientStrategy[")}


def _best_path(checkpoint: dict) -> Path:
    """The best checkpoint by val/loss (what ``fit`` tests at its end) as ranked in ``checkpoint``."""
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "'monitor': 'val/loss'" in k]
    return Path(state["best_model_path"])


def _plain(obj):
    """Tuples as lists (a ``random.Random`` state read back may differ only in that)."""
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


@pytest.mark.spawns
@pytest.mark.parametrize("case, signum", [("ernode", signal.SIGKILL), ("reversible", signal.SIGTERM)])
def test_killed_fit_resumes_exactly(cli, tmp_path, case, signum):
    extra = CASES[case]
    full_dir, run_dir, marker = tmp_path / "full", tmp_path / "killed", tmp_path / "blocked"
    resumed_dir = tmp_path / "resumed"  # `fit ckpt_path=...` writes a new run directory
    block = [f"+callbacks.block._target_={__name__}.BlockAt", f"+callbacks.block.marker={marker}",
             f"+callbacks.block.epoch={KILL_EPOCH}", "+callbacks.block.batch=1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **ENV}
    # The run to be killed starts in its own process; the uninterrupted run runs here meanwhile.
    killed_log = (tmp_path / "killed.log").open("w")
    killed = subprocess.Popen(_fit_command(run_dir, *extra, *block), cwd=tmp_path, env=env, stdout=killed_log,
                              stderr=subprocess.STDOUT)
    try:
        full = cli("fit", *COMMON, f"hydra.run.dir={full_dir}", *extra, cwd=tmp_path, env=ENV)
        (tmp_path / "full.log").write_text(full.stdout + full.stderr)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert killed.poll() is None, "the run ended before epoch 2:\n" + _tail(tmp_path / "killed.log")
            assert time.monotonic() < deadline, "the run to be killed never reached epoch 2"
            time.sleep(0.05)
        last = run_dir / "checkpoints" / "last.ckpt"
        digest = hashlib.sha256(last.read_bytes()).hexdigest()
        assert int(marker.read_text()) == killed.pid
        killed.send_signal(signum)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
        killed_log.close()
    if signum == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL
    else:  # Lightning's graceful stop: the step ends, nothing is saved, the exit status says SIGTERM
        assert killed.returncode == 128 + signal.SIGTERM, _tail(tmp_path / "killed.log")
        assert f"fit stopped by SIGTERM in epoch {KILL_EPOCH}" in _tail(tmp_path / "killed.log")
        assert f"resume with ckpt_path={last}" in (tmp_path / "killed.log").read_text()
    assert full.returncode == 0, _tail(tmp_path / "full.log")

    # The kill left last.ckpt as epoch 1's end wrote it: intact, not an earlier epoch's.
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    saved = _load(last)
    assert (saved["epoch"], saved["global_step"]) == (KILL_EPOCH - 1, KILL_EPOCH * BATCHES)
    if case == "ernode":
        state = saved["callbacks"]["GradientStrategy[LocalERNODE]"]
        assert state["step"] == KILL_EPOCH * BATCHES and state["previous_times"]  # mid-schedule, biased

    dump = tmp_path / "restored_state.pt"
    out = cli("fit", *COMMON, f"hydra.run.dir={resumed_dir}", *extra, f"ckpt_path={last}",
              f"+callbacks.dump._target_={__name__}.DumpStrategyState", f"+callbacks.dump.path={dump}",
              cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest  # the resumed run wrote elsewhere

    # The strategy's state as the resumed run starts training is what the checkpoint saved.
    assert _plain(_load(dump)) == _plain(_strategy_state(saved).get(f"GradientStrategy[{_class(case)}]", {}))

    # Same end as the uninterrupted run, bit for bit: weights, optimiser, strategy state, metrics.
    a, b = _load(full_dir / "checkpoints" / "last.ckpt"), _load(resumed_dir / "checkpoints" / "last.ckpt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (EPOCHS - 1, EPOCHS * BATCHES)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _plain(_strategy_state(a)) == _plain(_strategy_state(b))
    best_full, best_resumed = _best_path(a), _best_path(b)
    assert int(best_full.stem.removeprefix("epoch")) < KILL_EPOCH  # the case this config sets up
    assert best_resumed == run_dir / "checkpoints" / best_full.name  # the killed run's file
    full_metrics, resumed_metrics = _metrics(full_dir, first_epoch=KILL_EPOCH), _metrics(resumed_dir)
    assert [e for e, _ in full_metrics["val/loss"]] == list(range(KILL_EPOCH, EPOCHS))
    assert full_metrics["test/loss"] and full_metrics["test/acc"]
    assert full_metrics == resumed_metrics  # val/loss, val/acc of each resumed epoch, and the final test


def _tail(path: Path) -> str:
    return path.read_text()[-3000:]


def _class(case: str) -> str:
    return {"ernode": "LocalERNODE", "reversible": "Reversible"}[case]


def test_best_checkpoint_ranking_survives_a_resume_into_a_new_directory(tmp_path):
    old = ResumableCheckpoint(dirpath=tmp_path / "old", monitor="val/loss", save_top_k=1)
    best = str(tmp_path / "old" / "epoch001.ckpt")
    old.best_model_score, old.best_model_path, old.kth_best_model_path = torch.tensor(0.5), best, best
    old.best_k_models, old.kth_value = {best: torch.tensor(0.5)}, torch.tensor(0.5)
    new = ResumableCheckpoint(dirpath=tmp_path / "new", monitor="val/loss", save_top_k=1)
    new.load_state_dict(old.state_dict())
    assert (new.best_model_score, new.best_model_path, new.kth_value) == (0.5, best, 0.5)
    assert new.best_k_models == {best: 0.5} and new.kth_best_model_path == best
    stock = ModelCheckpoint(dirpath=tmp_path / "new", monitor="val/loss", save_top_k=1)
    with pytest.warns(UserWarning, match="dirpath has changed"):
        stock.load_state_dict(old.state_dict())
    assert stock.best_model_score is None and stock.best_k_models == {}  # why ResumableCheckpoint exists


def test_resumable_seeds_are_a_function_of_seed_epoch_and_batch():
    seeds = {derived_seed(s, *key) for s in (0, 1) for key in [(0,), (1,), (0, 0), (0, 1), (1, 0)]}
    assert len(seeds) == 10 and all(0 <= x < 2**32 for x in seeds)
    assert derived_seed(3, 2, 1) == derived_seed(3, 2, 1)
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            ResumableSeeds(seed=bad)
