"""The spawn-and-record harness of the DDP tests (tests/test_ddp.py, tests/test_pde_ddp.py).

:func:`spawn_and_record` starts ``WORLD`` processes (``spawn``); each joins a gloo group through
Lightning's ``ddp`` (LOCAL_RANK set: the torchrun/SLURM path, no re-launch) and, for every case,
builds ``make_case(case) -> (model, datamodule)``, runs one float64 training step and records with
:class:`Probe` its first batch, its weights before and after the step and the all-reduced gradient.
A case that raises is recorded as ``{"error": traceback}``, so the others still run and the test
names the failure (:func:`records_of`). ``make_case`` must be picklable: a module-level function
(or a ``functools.partial`` of one).

``reference(case, record, rank) -> dict`` (optional, picklable too): what one process computes from a
rank's record, added to that record. Each rank runs it after its last fit, once the process group is
destroyed and the distributed environment unset (a plain process from then on), so a reference reuses
what the rank already paid for (a compiled case's programs: 25 s for the CNF's) instead of a test
paying it again. One that raises is recorded as ``record["reference_error"]``.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
import torch.multiprocessing as mp

__all__ = ["WORLD", "flat_grad", "flat_params", "Probe", "free_port", "spawn_and_record", "records_of", "exit_now"]

WORLD = 2


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class Probe(lightning.Callback):
    """Keep this rank's first batch, the weights before and after the step, and the gradient."""

    def __init__(self) -> None:
        self.record: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["batch"] = [t.detach().clone() for t in batch]
        self.record["state_dict"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.record["params_before"] = flat_params(pl_module).clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.record["grad"] = flat_grad(pl_module).clone()  # all-reduced by now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["params_after"] = flat_params(pl_module).clone()
        self.record["world_size"] = trainer.world_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, make_case: Callable[[str], tuple[Any, Any]], cases: list[str],
            env: dict[str, str], reference: Callable[[str, dict, int], dict] | None = None) -> None:
    """One rank: LOCAL_RANK is set, so Lightning's ``ddp`` joins these processes (no re-launch)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(WORLD), PYTHONWARNINGS="ignore", **env)
    torch.set_num_threads(1)
    results = {}
    for case in cases:
        try:
            lightning.seed_everything(0, verbose=False)
            model, datamodule = make_case(case)
            probe = Probe()
            trainer = lightning.Trainer(
                accelerator="cpu", devices=WORLD, precision="64-true", max_steps=1, logger=False,
                strategy=lightning.pytorch.strategies.DDPStrategy(timeout=timedelta(seconds=90)),
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False, callbacks=[probe],
            )
            trainer.fit(model, datamodule)
            results[case] = probe.record
        except Exception:  # recorded, so the other cases still run and the test names the failure
            results[case] = {"error": traceback.format_exc()}
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank is past its last collective: none waits on one that left
        torch.distributed.destroy_process_group()
    if reference is not None:
        for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
        for case, record in results.items():
            if "error" in record:
                continue
            try:
                record.update(reference(case, record, rank))
            except Exception:  # recorded: the test that reads the reference names it
                record["reference_error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_now()


def exit_now() -> None:
    """End a rank whose results are saved without the interpreter's teardown, which took 2 s, and 8 s
    after a compile (modules, dynamo's caches, the process group), while the test waited on it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_and_record(out: Path, make_case: Callable[[str], tuple[Any, Any]], cases: Sequence[str],
                     env: Mapping[str, str] | None = None,
                     reference: Callable[[str, dict, int], dict] | None = None) -> dict[str, list[dict]]:
    """Run every case under ``WORLD``-process DDP once (one training step each, float64);
    ``{case: [rank 0 record, rank 1 record, ...]}``. ``env``: more environment for the workers;
    ``reference``: each rank's one-process figures, added to its records (see the module's doc)."""
    cases = list(cases)
    mp.start_processes(_worker, args=(free_port(), str(out), make_case, cases, dict(env or {}), reference),
                       nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {case: [ranks[r][case] for r in range(WORLD)] for case in cases}


def records_of(records: Mapping[str, list[dict]], case: str) -> list[dict]:
    """The ranks' records of ``case``; fails the test with the traceback of a rank where it raised."""
    for r, rec in enumerate(records[case]):
        if "error" in rec:
            pytest.fail(f"{case} failed on rank {r}:\n{rec['error']}")
    return records[case]
