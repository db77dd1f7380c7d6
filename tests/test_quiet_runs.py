"""A run prints none of the known noise: Lightning's litlogger tip and its treespec deprecation warning
(third-party, filtered by name: nde_zoo/quiet.py), nor Lightning's "callbacks ... will override" about the
gradient strategy re-attached for the test after fit (ours, fixed at the source)."""

from __future__ import annotations

import logging
import warnings

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from nde_zoo.configs_path import config_dir
from nde_zoo.quiet import LITLOGGER_TIP
from nde_zoo.train import run


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_fit_then_test_prints_none_of_the_noise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside Hydra the run directory is the working directory
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(
            "fit",
            overrides=[
                "strategy=auto",
                "strategy.solver=rk4",
                "strategy.steps=2",
                "strategy.memory_budget=1GB",
                "model.state_dim=4",
                "model.width=8",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "trainer.num_sanity_val_steps=0",
                "logger=none",
                "~callbacks",
            ],
        )
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    collect = _Collect()
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_info.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = run("fit", cfg)
    finally:
        lightning_info.removeHandler(collect)
    assert results and "test/acc" in results[0]  # the test after fit ran
    assert any(
        "GPU available" in m for m in collect.messages
    )  # Lightning's other messages still come through
    assert not [m for m in collect.messages if m.startswith(LITLOGGER_TIP) or "will override existing" in m]
    assert not [str(w.message) for w in caught if "treespec" in str(w.message)]
