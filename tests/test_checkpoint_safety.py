"""Nothing lost: checkpoints verified when written and read, run directories never shared.

- An unwritable ``checkpoints/`` folder used to let ``fit`` train to the end and exit 0 with no
  checkpoint (Lightning 2.6's writer swallows ``PermissionError``); now the first save fails the fit.
- A checkpoint with flipped bytes used to load silently (and test at 20% accuracy, or resume); now
  its checksum names the file, on the command line and in ``Model.load_from_checkpoint``.
- Two fits in one run directory overwrote each other's ``last.ckpt`` and ``.hydra/config.yaml``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from nde_zoo import checkpoints
from nde_zoo.checkpoints import (
    CHECKSUM_KEY,
    CheckpointError,
    VerifiedCheckpointIO,
    add_checksum,
    tensor_checksum,
    verify_checkpoint_file,
)
from nde_zoo.models import ODEClassifier
from tests.conftest import REPO
from tests.inprocess import run_cli

TINY = [
    "model=ode_classifier",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "strategy.solver=rk4",
    "strategy.steps=2",
    "model.state_dim=8",
    "model.width=16",
]
ENV = {
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "PYTHONWARNINGS": "ignore",
}


def _fit(
    *args: str, cwd: Path, prefix: tuple[str, ...] = (), timeout: int = 300
) -> subprocess.CompletedProcess:
    """``fit *TINY *args``: in this process, or after ``prefix`` (``setpriv ...``) in a subprocess."""
    if not prefix:
        return run_cli("fit", *TINY, *args, cwd=cwd, env={"PYTHONWARNINGS": "ignore"})
    return subprocess.run(
        [*prefix, sys.executable, "-m", "nde_zoo", "fit", *TINY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV},
    )


def _flip_tensor_bytes(path: Path, n: int = 400) -> None:
    """Flip ``n`` bytes in the largest tensor record of a ``torch.save`` zip (its pickle stays readable)."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    off = record.header_offset
    start = (
        off
        + 30
        + int.from_bytes(data[off + 26 : off + 28], "little")
        + int.from_bytes(data[off + 28 : off + 30], "little")
    )
    for k in range(n):
        data[start + (7 * k) % record.file_size] ^= 0xFF
    path.write_bytes(bytes(data))


# -- checksums ---------------------------------------------------------------------------------------
def test_checksum_survives_a_round_trip_and_catches_flipped_bytes(tmp_path):
    checkpoint = {
        "state_dict": {"w": torch.randn(64, 64), "b": torch.randn(64).bfloat16(), "n": torch.tensor(3)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(64, 64)}}}],
        "epoch": 2,
        "hyper_parameters": {"lr": 1e-3, "strategy": {"_target_": "x"}},
        "odd": {1, 2},
    }
    add_checksum(checkpoint)
    path = tmp_path / "a.ckpt"
    torch.save(checkpoint, path)
    assert verify_checkpoint_file(path)["epoch"] == 2
    _flip_tensor_bytes(path)
    assert torch.load(path, weights_only=False)["epoch"] == 2  # torch itself loads it silently
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupted"):
        verify_checkpoint_file(path)


def test_checksum_covers_plain_values_and_only_the_weights_when_asked():
    a = {"state_dict": {"w": torch.ones(3)}, "epoch": 1}
    b = {"state_dict": {"w": torch.ones(3)}, "epoch": 2}
    assert tensor_checksum(a)["digest"] != tensor_checksum(b)["digest"]
    assert tensor_checksum(a, "state_dict")["digest"] == tensor_checksum(b, "state_dict")["digest"]
    c = {"state_dict": {"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}, "epoch": 1}
    assert tensor_checksum(a, "state_dict")["digest"] != tensor_checksum(c, "state_dict")["digest"]


def test_plugin_stops_at_a_write_that_did_not_land(tmp_path, monkeypatch):
    """The file read back is not what was written (a filesystem that lost the write): a clear error."""
    io = VerifiedCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}}, tmp_path / "ok.ckpt")
    assert verify_checkpoint_file(tmp_path / "ok.ckpt")[CHECKSUM_KEY]["scope"] == "all"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left

    def lossy(checkpoint, path):
        path.write_bytes(b"PK\x03\x04 truncated")

    monkeypatch.setattr(checkpoints, "_write_atomically", lossy)
    with pytest.raises(CheckpointError, match="bad.ckpt was written but cannot be read back"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(4)}}, tmp_path / "bad.ckpt")

    def refused(checkpoint, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoints, "_write_atomically", refused)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*denied.ck.ckpt: PermissionError"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(4)}}, tmp_path / "denied.ck.ckpt")


def _drop_privileges() -> tuple[str, ...]:
    """As root, write permissions are not enforced: drop every capability (setpriv) for the child."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: an unwritable folder cannot be simulated")
    return ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")


def _immutable(folder: Path, on: bool = True) -> bool:
    """As root, make ``folder`` unwritable for this very process: its immutable attribute (``chattr +i``,
    where the filesystem has one); writing into it then raises PermissionError (EPERM) as the mode
    bits do for anyone else (EACCES), and the fit runs in process instead of in a process without
    capabilities (5-8 s of imports). False where that cannot be done (not root, no chattr, tmpfs)."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True).returncode == 0


@pytest.mark.spawns  # as root without an immutable attribute: the fit runs without capabilities (setpriv)
def test_unwritable_checkpoint_folder_fails_the_fit_at_the_first_save(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o555)
    immutable = _immutable(run / "checkpoints")
    try:
        prefix = () if immutable else _drop_privileges()
        out = _fit(f"hydra.run.dir={run}", "trainer.max_epochs=3", cwd=tmp_path, prefix=prefix)
    finally:
        if immutable:
            _immutable(run / "checkpoints", on=False)
        (run / "checkpoints").chmod(0o755)
    text = out.stdout + out.stderr
    assert out.returncode != 0, "fit exited 0 without writing a checkpoint:\n" + text[-3000:]
    assert f"could not write checkpoint {run / 'checkpoints'}" in text and "PermissionError" in text, text[
        -3000:
    ]
    assert "Epoch 1" not in text and "test with" not in text  # stopped at the first save, epoch 0
    assert not list((run / "checkpoints").iterdir())


# -- the command line and load_from_checkpoint -------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny fit; returns its run directory."""
    tmp = tmp_path_factory.mktemp("fit")
    out = _fit(f"hydra.run.dir={tmp / 'run'}", "test_after_fit=false", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run"


def test_every_saved_checkpoint_carries_a_verified_checksum(trained):
    files = sorted((trained / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in files} >= {"last.ckpt"} and len(files) == 2
    for path in files:
        saved = verify_checkpoint_file(path)[CHECKSUM_KEY]
        assert saved["scope"] == "all" and saved["tensors"] >= 6  # weights and optimiser moments
    assert not [p for p in (trained / "checkpoints").iterdir() if p.suffix == ".tmp"]


def test_corrupted_checkpoint_is_refused_naming_the_file(trained, tmp_path):
    bad = tmp_path / "bad.ckpt"
    shutil.copy(trained / "checkpoints" / "last.ckpt", bad)
    _flip_tensor_bytes(bad)
    for sub in ("test", "fit"):  # evaluating it, and resuming a fit from it
        out = run_cli(sub, *TINY, f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / sub}", cwd=tmp_path,
                      env={"PYTHONWARNINGS": "ignore"})
        assert out.returncode != 0, out.stdout[-2000:]
        assert f"ckpt_path={bad} ({bad}) is corrupted" in out.stderr, out.stderr[-2000:]
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is corrupted"):
        ODEClassifier.load_from_checkpoint(bad)
    assert isinstance(
        ODEClassifier.load_from_checkpoint(trained / "checkpoints" / "last.ckpt"), ODEClassifier
    )


def test_weights_checksum_of_a_plain_lightning_trainer(tmp_path):
    """Without the plugin (a plain ``lightning.Trainer``) the model's own hook still checksums the weights."""
    import lightning

    from nde_zoo.datamodules import DigitsDataModule
    from nde_zoo.strategies import Direct

    model = ODEClassifier(Direct("rk4", steps=2), state_dim=8, width=16)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)[CHECKSUM_KEY]["scope"] == "state_dict"
    _flip_tensor_bytes(path)
    with pytest.raises(CheckpointError, match="plain.ckpt is corrupted"):
        ODEClassifier.load_from_checkpoint(path)


@pytest.mark.spawns
# -- run directories ---------------------------------------------------------------------------------
def test_two_fits_started_together_get_their_own_run_directories(tmp_path):
    """Default run directories (no hydra.run.dir): two fits started at the same moment do not share one."""
    command = [sys.executable, "-m", "nde_zoo", "fit", *TINY, "test_after_fit=false", "trainer.max_epochs=1"]
    procs = [
        subprocess.Popen(
            [*command, f"seed={seed}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **ENV},
        )
        for seed in (1, 2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    runs = sorted((tmp_path / "outputs" / "fit" / "ode_classifier").iterdir())
    assert len(runs) == 2, runs
    seeds = sorted(
        next(
            line
            for line in (r / ".hydra" / "config.yaml").read_text().splitlines()
            if line.startswith("seed:")
        )
        for r in runs
    )
    assert seeds == ["seed: 1", "seed: 2"]
    assert all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)


def test_a_fit_never_writes_into_another_runs_directory(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    out = _fit(f"hydra.run.dir={run}", "test_after_fit=false", cwd=tmp_path)
    assert out.returncode != 0
    assert f"the run directory {run.resolve()} already holds another run's checkpoints" in out.stderr, (
        out.stderr[-2000:]
    )
    assert f"ckpt_path={run.resolve() / 'checkpoints' / 'last.ckpt'}" in out.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    # resuming that very run, in place, is allowed
    out = _fit(
        f"hydra.run.dir={run}",
        "test_after_fit=false",
        "trainer.max_epochs=3",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2


@pytest.mark.spawns
def test_two_fits_pinned_to_one_directory_at_once_one_is_refused(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "nde_zoo", "fit", *TINY, "test_after_fit=false", f"hydra.run.dir={run}"]
    procs = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **ENV},
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 1], outs[0][-2000:] + outs[1][-2000:]
    refused = outs[[p.returncode for p in procs].index(1)]
    assert "belongs to another fit" in refused or "already holds another run's checkpoints" in refused, (
        refused[-2000:]
    )


def test_claim_run_dir_rules(tmp_path, monkeypatch):
    """The claim, directly: refused twice, a dead fit's claim taken over, SLURM requeue, other ranks."""
    import json
    import socket

    from nde_zoo.checkpoints import CLAIM_FILE, claim_run_dir

    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "run"
    claim_run_dir(run, None)
    assert json.loads((run / CLAIM_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(SystemExit, match="belongs to another fit"):
        claim_run_dir(run, None)  # a live fit (this process) owns it

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / CLAIM_FILE).write_text(json.dumps({"id": "x", "pid": int(dead.stdout), "host": socket.gethostname()}))
    claim_run_dir(run, None)  # its fit died before writing a checkpoint: taken over
    assert json.loads((run / CLAIM_FILE).read_text())["pid"] == os.getpid()
    assert list(run.glob(f"{CLAIM_FILE}.dead-*"))

    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit, match="already holds another run's checkpoints"):
        claim_run_dir(run, None)
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"")  # Lightning's SLURM requeue resumes from this by itself
    claim_run_dir(run, None)
    claim_run_dir(run, str(run / "checkpoints" / "last.ckpt"))  # resuming in place

    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):  # other ranks share rank 0's directory
        with monkeypatch.context() as m:
            m.setenv(key, "1")
            claim_run_dir(tmp_path / "other", None)
            assert not (tmp_path / "other").exists()
