"""model=pde under DDP on the CPU (gloo, 2 processes), as tests/test_ddp.py checks the other models:
the ranks see different windows yet hold the same all-reduced gradient and weights after the step,
and that gradient is the mean of what one process computes on each rank's batch (float64, fixed
steps: Direct and Reversible, whose backward is its own autograd Function)."""

from __future__ import annotations

import functools

import pytest
import torch

import nde_zoo.strategies as strategies
from nde_zoo.datamodules.pde import PDEDataModule
from nde_zoo.models.pde import PDEModel
from tests.ddp_harness import WORLD, flat_grad, records_of, spawn_and_record

pytestmark = [pytest.mark.ddp, pytest.mark.filterwarnings("ignore:You are trying to .self.log")]

CASES = {"direct": lambda: strategies.Direct("midpoint", step_size=0.05),
         "reversible": lambda: strategies.Reversible("midpoint", step_size=0.05, coupling=0.5)}


def make_case(name: str, cache: str) -> tuple[PDEModel, PDEDataModule]:
    data = PDEDataModule(points=16, refine=2, n_train=4, n_val=1, n_test=1, n_obs=4, train_window=2,
                         window_stride=1, batch_size=2, cache_dir=cache)
    return PDEModel(CASES[name](), points=16, diffusion=[0.05], width=4, depth=1), data


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("pde_ddp")
    cache = str(out / "cache")
    make_case("direct", cache)[1].load_or_generate()  # generated once, read by both ranks
    return spawn_and_record(out, functools.partial(make_case, cache=cache), list(CASES)), cache


@pytest.mark.parametrize("name", sorted(CASES))
def test_pde_ranks_agree_and_the_gradient_is_the_mean_of_each_ranks(ddp_records, name):
    records, cache = ddp_records
    r0, r1 = records_of(records, name)
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
