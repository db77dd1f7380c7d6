"""DDP: the process-group timeout is set through ``trainer.strategy``, and a rank that dies takes the
fit down within seconds, leaving ``last.ckpt`` whole and verifiable (docs/reliability.md).

Two processes on the CPU (gloo), started by Lightning from the command line (``trainer=ddp``);
rank 1 kills itself with SIGKILL in the middle of epoch 1, after epoch 0 wrote ``last.ckpt``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lightning
import pytest

from nde_zoo.checkpoints import verify_checkpoint_file
from tests.conftest import REPO

TIMEOUT_OVERRIDE = (
    "trainer.strategy={_target_:lightning.pytorch.strategies.DDPStrategy,"
    "timeout:{_target_:datetime.timedelta,seconds:120}}"
)


class KillRankAt(lightning.Callback):
    """Test-only: at ``(epoch, batch)`` global rank ``rank`` sends itself SIGKILL (no cleanup at all)."""

    def __init__(self, rank: int, epoch: int, batch: int) -> None:
        self.rank, self.epoch, self.batch = rank, epoch, batch

    def setup(self, trainer, pl_module, stage) -> None:
        # the strategy object came from the command line, with its timeout: say so for the test
        print(f"rank {trainer.global_rank}: process group timeout {trainer.strategy._timeout}", flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.global_rank, trainer.current_epoch, batch_idx) == (self.rank, self.epoch, self.batch):
            print(f"rank {self.rank}: killing myself at epoch {self.epoch} batch {batch_idx}", flush=True)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.spawns
@pytest.mark.ddp
@pytest.mark.standalone
def test_a_dead_rank_fails_the_fit_within_seconds_and_last_ckpt_stays_loadable(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "nde_zoo",
        "fit",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        TIMEOUT_OVERRIDE,
        "model=ode_classifier",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "strategy.solver=rk4",
        "strategy.steps=2",
        "model.state_dim=8",
        "model.width=16",
        "test_after_fit=false",
        f"hydra.run.dir={run}",
        f"+callbacks.kill._target_={__name__}.KillRankAt",
        "+callbacks.kill.rank=1",
        "+callbacks.kill.epoch=1",
        "+callbacks.kill.batch=1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, killed_at = [], None
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "killing myself" in line:
                killed_at = time.monotonic()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert killed_at is not None, out[-4000:]
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0, out[-4000:]
    assert elapsed < 60, f"the surviving rank took {elapsed:.0f} s to fail (timeout 120 s)"
    assert "rank 0: process group timeout 0:02:00" in out, out[-4000:]
    checkpoint = verify_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 3)  # epoch 0's end, whole and verified
    print(f"surviving rank failed {elapsed:.1f} s after rank 1 died")
