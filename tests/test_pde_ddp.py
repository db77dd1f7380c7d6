"""model=pde under DDP on the CPU (gloo, 2 processes), as tests/test_ddp.py checks the other models:
the ranks see different windows yet hold the same all-reduced gradient and weights after the step,
and that gradient is the mean of what one process computes on each rank's batch (float64, fixed
steps: Direct and Reversible, whose backward is its own autograd Function)."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import lightning
import pytest
import torch
import torch.multiprocessing as mp

import nde_zoo.strategies as strategies
from nde_zoo.datamodules.pde import PDEDataModule
from nde_zoo.models.pde import PDEModel

pytestmark = [pytest.mark.ddp, pytest.mark.filterwarnings("ignore:You are trying to .self.log")]

WORLD = 2
CASES = {"direct": lambda: strategies.Direct("midpoint", step_size=0.05),
         "reversible": lambda: strategies.Reversible("midpoint", step_size=0.05, coupling=0.5)}


def make_case(name: str, cache: str) -> tuple[PDEModel, PDEDataModule]:
    data = PDEDataModule(points=16, refine=2, n_train=4, n_val=1, n_test=1, n_obs=4, train_window=2,
                         window_stride=1, batch_size=2, cache_dir=cache)
    return PDEModel(CASES[name](), points=16, diffusion=[0.05], width=4, depth=1), data


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class Probe(lightning.Callback):
    def __init__(self) -> None:
        self.record: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["batch"] = [t.detach().clone() for t in batch]
        self.record["state_dict"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.record["params_before"] = flat_params(pl_module).clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.record["grad"] = flat_grad(pl_module).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["params_after"] = flat_params(pl_module).clone()
        self.record["world_size"] = trainer.world_size


def _worker(rank: int, port: int, out_dir: str, cache: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(WORLD), PYTHONWARNINGS="ignore")
    torch.set_num_threads(1)
    results = {}
    for name in CASES:
        try:
            lightning.seed_everything(0, verbose=False)
            model, datamodule = make_case(name, cache)
            probe = Probe()
            trainer = lightning.Trainer(
                accelerator="cpu", devices=WORLD, precision="64-true", max_steps=1, logger=False,
                strategy=lightning.pytorch.strategies.DDPStrategy(timeout=timedelta(seconds=90)),
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False, callbacks=[probe],
            )
            trainer.fit(model, datamodule)
            results[name] = probe.record
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("pde_ddp")
    cache = out / "cache"
    make_case("direct", str(cache))[1].load_or_generate()  # generated once, read by both ranks
    mp.start_processes(_worker, args=(_free_port(), str(out), str(cache)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {name: [ranks[r][name] for r in range(WORLD)] for name in CASES}, str(cache)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pde_ranks_agree_and_the_gradient_is_the_mean_of_each_ranks(ddp_records, name):
    records, cache = ddp_records
    for r, rec in enumerate(records[name]):
        if "error" in rec:
            pytest.fail(f"{name} failed on rank {r}:\n{rec['error']}")
    r0, r1 = records[name]
    assert r0["world_size"] == r1["world_size"] == WORLD
    assert not torch.equal(r0["batch"][1], r1["batch"][1]), "both ranks saw the same windows"
    assert r0["grad"].dtype == torch.float64 and r0["grad"].abs().max() > 0
    assert torch.equal(r0["grad"], r1["grad"])
    assert torch.equal(r0["params_after"], r1["params_after"])
    assert not torch.equal(r0["params_after"], r0["params_before"])
    mean = 0
    for rec in (r0, r1):  # one process, the same weights, each rank's batch
        model, _ = make_case(name, cache)
        model.double().load_state_dict(rec["state_dict"])
        model.training_step([t.double() for t in rec["batch"]], 0).backward()
        mean = mean + flat_grad(model) / WORLD
    error = ((r0["grad"] - mean).abs().max() / mean.abs().max()).item()
    assert error < 1e-12, f"{name}: DDP gradient vs the mean of per-rank ones: relative error {error:.3g}"
