"""The main job's quality: FFJORD's concat-squash field, a Gaussian-mixture
baseline on the same split in the test log, and a density picture on a log scale. The full main job
(test NLL <= 0.45 nats) is the slow test at the end (marked manual: not in `make test`; `make test-all` runs it)."""

from __future__ import annotations

import re

import lightning
import pytest
import torch

from nde_zoo.datamodules import Toy2DDataModule
from nde_zoo.models import CNF
from nde_zoo.models.cnf import ConcatSquashLinear, ConcatSquashVelocity, MLPVelocity, gaussian_mixture_nll
from nde_zoo.strategies import Reversible


def test_concat_squash_layers_are_conditioned_on_time():
    torch.manual_seed(0)
    layer = ConcatSquashLinear(2, 3)
    x = torch.randn(4, 2)
    assert not torch.allclose(layer(torch.tensor(0.0), x), layer(torch.tensor(1.0), x))
    assert isinstance(CNF(Reversible("rk4", steps=2)).field.net, ConcatSquashVelocity)  # the default
    assert isinstance(CNF(Reversible("rk4", steps=2), architecture="concat").field.net, MLPVelocity)
    with pytest.raises(ValueError, match="architecture must be one of concatsquash, concat"):
        CNF(Reversible("rk4", steps=2), architecture="resnet")


def test_the_gaussian_mixture_baseline_is_logged_next_to_the_flows_nll(tmp_path):
    lightning.seed_everything(0)
    data = Toy2DDataModule(n_train=256, n_val=32, n_test=64, batch_size=64)
    model = CNF(Reversible("rk4", steps=2), width=8, baseline_components=4)
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, inference_mode=False, default_root_dir=str(tmp_path))
    results = trainer.test(model, data, verbose=False)[0]
    expected = gaussian_mixture_nll(data.split("train"), data.split("test"), 4)
    assert results["test/gmm_nll"] == pytest.approx(expected, rel=1e-6)
    assert "test/nll" in results


def test_the_full_two_moons_mixture_matches_the_issues_figure():
    data = Toy2DDataModule()
    assert gaussian_mixture_nll(data.split("train"), data.split("test"), 20) == pytest.approx(0.31, abs=0.02)


@pytest.mark.manual
@pytest.mark.slow
def test_the_main_job_reaches_its_goal(cli, tmp_path):
    """``make fit``, the command users type: the README's main job, test NLL <= 0.45 nats (the data's
    entropy is about 0.26), with the CNF config's own stepping (rk4, 4 steps)."""
    out = cli("fit", "model=cnf", "strategy=reversible", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
              timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    nll = float(re.search(r"test/nll = ([0-9.]+)", text).group(1))
    assert nll <= 0.45, text[-2000:]
    assert "test/gmm_nll" in text and (tmp_path / "run" / "cnf_samples.png").is_file()
