"""Launching the CLI the ways the README documents: torchrun (one node, and two "nodes" on
one machine with trainer.num_nodes), srun (SLURM's variables, set by hand), and Hydra sweeps
through hydra-submitit-launcher's local executor (the SLURM launcher's smoke test).

Under torchrun and srun every rank runs ``@hydra.main`` itself, so each would compute its own
``${now:}`` run directory: the commands pin ``hydra.run.dir`` / ``hydra.sweep.dir``, as the
README says to. The tests marked ``standalone`` start several processes (not in ``make check``).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nde_zoo import cli as nde_cli

TINY = ["model=ode_classifier", "trainer.accelerator=cpu", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0", "strategy.solver=rk4", "strategy.steps=2", "strategy.rtol=null",
        "strategy.atol=null"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT = 300


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(commands: list[list[str]], cwd: Path, envs: list[dict] | None = None) -> list[tuple[int, str]]:
    """Start every command at once (ranks must meet), wait for all: ``[(rc, stdout+stderr)]``."""
    envs = envs or [_env()] * len(commands)
    procs = [subprocess.Popen(c, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, e in zip(commands, envs, strict=True)]
    try:
        return [_wait(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


def _members(text: str, world: int) -> set[int]:
    """Global ranks that Lightning reports as initialised in ``text``."""
    return {r for r in range(world) if f"GLOBAL_RANK: {r}, MEMBER: {r + 1}/{world}" in text}


def _check_one_run(run_dir: Path, steps: int) -> None:
    """One checkpointed run: ``last.ckpt`` after ``steps`` optimiser steps (not one per rank)."""
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["epoch000.ckpt", "last.ckpt"], checkpoints
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps


@pytest.mark.spawns
@pytest.mark.ddp
@pytest.mark.standalone
def test_torchrun_two_processes_train_one_run(tmp_path):
    """``torchrun --standalone --nproc_per_node=2 -m nde_zoo fit trainer=ddp ...``: no re-launch,
    both ranks train (DistributedSampler: 2 batches each, so 2 steps), one run directory."""
    run_dir = tmp_path / "run"
    command = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "nde_zoo", "fit", "trainer=ddp",
               "trainer.devices=2", "strategy=reversible", *TINY, f"hydra.run.dir={run_dir}"]
    [(rc, out)] = _run_all([command], tmp_path)
    assert rc == 0, out[-4000:]
    assert _members(out, 2) == {0, 1}, out[-4000:]
    log = (run_dir / "cli.log").read_text()
    assert _members(log, 2) == {0, 1}  # both ranks logged into the pinned directory
    assert log.count("Initializing distributed") == 2  # torchrun's two processes, no Lightning re-launch
    assert not (tmp_path / "outputs").exists()
    _check_one_run(run_dir, steps=2)


@pytest.mark.spawns
@pytest.mark.ddp
@pytest.mark.standalone
def test_torchrun_two_nodes_and_a_multirun_sweep(tmp_path):
    """The README's multi-node line with two "nodes" on this machine (``--nnodes=2
    --node_rank=i --master_addr``, ``trainer.num_nodes=2 trainer.devices=1``), as a 2-job
    ``-m`` sweep: not refused under torchrun, each rank runs the sweep in step."""
    port, sweep = _free_port(), tmp_path / "sweep"
    commands = [
        [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1",
         f"--master_port={port}", "-m", "nde_zoo", "fit", "-m", "trainer=ddp", "trainer.devices=1",
         "trainer.num_nodes=2", "strategy=direct,symplectic", *TINY, f"hydra.sweep.dir={sweep}"]
        for node in (0, 1)
    ]
    results = _run_all(commands, tmp_path)
    for node, (rc, out) in enumerate(results):
        assert rc == 0, f"node {node}:\n{out[-4000:]}"
    assert _members(results[0][1] + results[1][1], 2) == {0, 1}
    for job, name in enumerate(("Direct", "Symplectic")):
        assert f"gradient strategy {name}(" in (sweep / str(job) / "cli.log").read_text()
        _check_one_run(sweep / str(job), steps=2)
    assert not (tmp_path / "multirun").exists()


@pytest.mark.spawns
@pytest.mark.ddp
@pytest.mark.standalone
def test_srun_tasks_train_one_run(tmp_path):
    """What ``srun --ntasks-per-node=2 python -m nde_zoo fit trainer=ddp trainer.devices=2`` starts:
    two processes with SLURM's variables; Lightning's SLURMEnvironment makes them the ranks."""
    run_dir, port = tmp_path / "slurm_4242", _free_port()
    command = [sys.executable, "-m", "nde_zoo", "fit", "trainer=ddp", "trainer.devices=2",
               "trainer.num_nodes=1", "strategy=checkpoint", "strategy.snapshots=2", *TINY,
               f"hydra.run.dir={run_dir}"]
    slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_NODEID="0",
                 SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="nde_zoo",
                 MASTER_PORT=str(port))
    envs = [_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in (0, 1)]
    results = _run_all([command, command], tmp_path, envs)
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"task {rank}:\n{out[-4000:]}"
    assert _members(results[0][1] + results[1][1], 2) == {0, 1}
    assert "SLURM auto-requeueing enabled" in results[0][1]
    _check_one_run(run_dir, steps=2)


def _ddp_cfg():
    return OmegaConf.create({"trainer": {"strategy": "ddp"}})


def test_multirun_refusal_applies_only_outside_slurm_and_torchrun(monkeypatch):
    """A sweep with subprocess DDP is refused unless SLURM or torchrun created the processes."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    with pytest.raises(SystemExit, match="re-launch the whole sweep"):
        nde_cli._refuse_replayed_ddp(_ddp_cfg())
    nde_cli._refuse_replayed_ddp(OmegaConf.create({"trainer": {"strategy": "ddp_spawn"}}))
    ddp_object = {"_target_": "lightning.pytorch.strategies.DDPStrategy",  # with a timeout (docs/reliability.md)
                  "timeout": {"_target_": "datetime.timedelta", "minutes": 5}}
    with pytest.raises(SystemExit, match="re-launch the whole sweep"):
        nde_cli._refuse_replayed_ddp(OmegaConf.create({"trainer": {"strategy": ddp_object}}))
    nde_cli._refuse_replayed_ddp(OmegaConf.create({"trainer": {"strategy": {**ddp_object, "start_method": "spawn"}}}))
    with monkeypatch.context() as m:  # a SLURM task (srun, or hydra/launcher=slurm)
        for key, value in dict(SLURM_NTASKS="2", SLURM_JOB_NAME="nde_zoo").items():
            m.setenv(key, value)
        nde_cli._refuse_replayed_ddp(_ddp_cfg())
    with monkeypatch.context() as m:  # a torchrun worker
        for key, value in dict(TORCHELASTIC_RUN_ID="x", RANK="0", GROUP_RANK="0", LOCAL_RANK="0",
                               LOCAL_WORLD_SIZE="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT="29500").items():
            m.setenv(key, value)
        nde_cli._refuse_replayed_ddp(_ddp_cfg())


@pytest.mark.spawns
def test_submitit_local_launcher_runs_each_job(tmp_path):
    """``hydra/launcher=local``: hydra-submitit-launcher's local executor (the SLURM launcher's
    code path without SLURM) runs each sweep job as its own process, to completion."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the [slurm] extra")
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "nde_zoo", "fit", "-m", "hydra/launcher=local",
               "strategy=direct,reversible", *TINY, f"hydra.sweep.dir={sweep}"]
    [(rc, out)] = _run_all([command], tmp_path)
    assert rc == 0, out[-4000:]
    assert "Submitit 'local' sweep output dir" in out
    for job, name in enumerate(("Direct", "Reversible")):
        assert f"gradient strategy {name}(" in (sweep / str(job) / "cli.log").read_text()
        _check_one_run(sweep / str(job), steps=2)
    results = sorted(sweep.glob(".submitit/*/*_result.pkl"))
    assert len(results) == 2
    for path in results:  # submitit's own record of each job: ("success", hydra's JobReturn)
        status, job_return = pickle.loads(path.read_bytes())
        assert status == "success" and job_return.status.name == "COMPLETED"
        assert "test/acc" in job_return.return_value[0]
    logs = [p.read_text() for p in sweep.glob(".submitit/*/*_log.out")]
    assert len(logs) == 2 and all("Starting with JobEnvironment" in t for t in logs)


FAKE_SBATCH = """#!/bin/sh
# sbatch stand-in: keep the job script, answer as SLURM does
for last; do :; done
cp "$last" "$FAKE_SBATCH_OUT/job.sh"
echo "Submitted batch job 4242"
"""


@pytest.mark.spawns
def test_slurm_launcher_submits_one_task_per_device(tmp_path):
    """``hydra/launcher=slurm`` with stand-ins for ``sbatch``/``srun`` on PATH: the job script
    asks for trainer.num_nodes nodes and trainer.devices tasks (and GPUs) per node, one array
    task per sweep job, and runs the job with ``srun``. (Nothing runs: the launcher then waits
    for SLURM, and the test stops it.)"""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the [slurm] extra")
    bin_dir, out_dir = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    out_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that it exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    command = [sys.executable, "-m", "nde_zoo", "fit", "-m", "hydra/launcher=slurm", "trainer=ddp",
               "trainer.devices=2", "trainer.num_nodes=3", "strategy=direct,reversible",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SBATCH_OUT=str(out_dir))
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    script = out_dir / "job.sh"
    try:
        for _ in range(1200):
            if script.is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        out, _ = proc.communicate()
    assert script.is_file(), out[-4000:]
    text = script.read_text()
    for directive in ("--nodes=3", "--ntasks-per-node=2", "--gpus-per-node=2", "--array=0-1%2",
                      "--signal=USR2@90", "--time=240"):
        assert f"#SBATCH {directive}\n" in text, f"{directive} missing from the job script:\n{text}"
    assert "\nsrun " in text and "-m submitit.core._submit" in text
