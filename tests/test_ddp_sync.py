"""Under DDP the figures that select or report are the mean over every rank, not each rank's own.

Two gloo ranks on the CPU, created outside Lightning (LOCAL_RANK set, as in tests/test_ddp.py):

1. a model whose validation loss is scripted per rank and epoch: the best checkpoint
   (ModelCheckpoint on ``val/loss``, as configs/callbacks/default.yaml) is the one with the lowest
   loss averaged over both ranks, and both ranks select the same file with the same score. Without
   the sync each rank scores its own loss, and a rank that sees no improvement vetoes the save:
   the checkpoint of the global best epoch is never written;
2. the real ODE classifier, each rank validating and testing on its own shard (different losses,
   different adaptive NFE): ``val/loss``, ``val/nfe``, ``train/nfe``, ``test/loss`` and ``test/nfe``
   are the same on both ranks, the mean of what each computed, and Lightning's "use sync_dist=True"
   warning is not raised.
"""

from __future__ import annotations

import os
import socket
import traceback
import warnings
from datetime import timedelta

import lightning
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nde_zoo.callbacks import ResumableCheckpoint
from nde_zoo.datamodules import DigitsDataModule
from nde_zoo.models import ODEClassifier
from nde_zoo.models.base import NeuralDE
from nde_zoo.strategies import Direct

pytestmark = [pytest.mark.ddp]

WORLD = 2
#: validation loss per rank and epoch; averaged over the ranks: 1.0, 0.65, 1.05 (best: epoch 1),
#: while rank 1 alone sees no improvement after epoch 0.
SCRIPTED = [[1.0, 0.2, 0.9], [1.0, 1.1, 1.2]]
REPORTED = ("val/loss", "val/nfe", "train/nfe", "test/loss", "test/nfe")


class ScriptedValidation(NeuralDE):
    """Trains a tiny ODE; its validation loss is ``SCRIPTED[rank][epoch]``, logged as the models log it."""

    def __init__(self, strategy) -> None:
        super().__init__(strategy, lr=1e-3)
        self.field = nn.Linear(2, 2)

    def _common_step(self, batch, stage):
        (x,) = batch
        solution = self.solve(lambda t, y: self.field(y), x, torch.tensor([0.0, 1.0]))
        loss = solution.ys[-1].pow(2).mean()
        if stage == "val":
            loss = loss.new_tensor(SCRIPTED[self.global_rank][self.current_epoch])
        self.log(f"{stage}/loss", loss, batch_size=len(x))
        return loss


class Scripted(lightning.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:4]), batch_size=2)


class LocalFigures(lightning.Callback):
    """Each rank's own validation/test losses (what the step returned, before any sync)."""

    def __init__(self) -> None:
        self.val: list[float] = []
        self.test: list[float] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.append(float(outputs))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test.append(float(outputs))


def _trainer(**kwargs) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        devices=WORLD,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=lightning.pytorch.strategies.DDPStrategy(timeout=timedelta(seconds=90)),
        num_sanity_val_steps=0,
        **kwargs,
    )


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    record: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lightning.seed_everything(0, verbose=False)
            best = ResumableCheckpoint(
                dirpath=os.path.join(out_dir, "checkpoints"),
                filename="epoch{epoch:03d}",
                auto_insert_metric_name=False,
                monitor="val/loss",
                mode="min",
                save_top_k=1,
            )
            trainer = _trainer(max_epochs=len(SCRIPTED[0]), callbacks=[best])
            trainer.fit(ScriptedValidation(Direct("euler", steps=1)), Scripted())
            record["best_path"] = os.path.basename(best.best_model_path)
            record["best_score"] = float(best.best_model_score)

            lightning.seed_everything(0, verbose=False)
            local = LocalFigures()
            model = ODEClassifier(Direct("dopri5", rtol=1e-3, atol=1e-5), state_dim=4, width=8)
            data = DigitsDataModule(batch_size=16)
            trainer = _trainer(
                max_epochs=1,
                limit_train_batches=2,
                limit_val_batches=1,
                limit_test_batches=1,
                enable_checkpointing=False,
                callbacks=[local],
            )
            trainer.fit(model, data)
            record["fit"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
            record["test"] = {k: float(v) for k, v in trainer.test(model, data, verbose=False)[0].items()}
            record["local_val"], record["local_test"] = local.val, local.test
        record["sync_warnings"] = [str(w.message) for w in caught if "sync_dist" in str(w.message)]
    except Exception:
        record["error"] = traceback.format_exc()
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_sync")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, rec in enumerate(records):
        if "error" in rec:
            pytest.fail(f"rank {r} failed:\n{rec['error']}")
    return records


def test_both_ranks_select_the_checkpoint_of_the_best_mean_loss(ranks):
    means = [sum(col) / WORLD for col in zip(*SCRIPTED, strict=True)]
    best_epoch = min(range(len(means)), key=means.__getitem__)
    assert best_epoch == 1
    assert [r["best_path"] for r in ranks] == [f"epoch{best_epoch:03d}.ckpt"] * WORLD
    assert [r["best_score"] for r in ranks] == pytest.approx([means[best_epoch]] * WORLD)


def test_reported_figures_are_the_mean_over_ranks(ranks):
    local_val = [r["local_val"][0] for r in ranks]
    local_test = [r["local_test"][0] for r in ranks]
    assert (
        abs(local_val[0] - local_val[1]) > 1e-4 and abs(local_test[0] - local_test[1]) > 1e-4
    )  # shards differ
    for key in REPORTED:
        where = "test" if key.startswith("test/") else "fit"
        values = [r[where][key] for r in ranks]
        assert values[0] == pytest.approx(values[1], rel=1e-6), (key, values)
    assert ranks[0]["fit"]["val/loss"] == pytest.approx(sum(local_val) / WORLD, rel=1e-5)
    assert ranks[0]["test"]["test/loss"] == pytest.approx(sum(local_test) / WORLD, rel=1e-5)


def test_lightning_does_not_ask_for_sync_dist(ranks):
    assert [r["sync_warnings"] for r in ranks] == [[]] * WORLD
