"""docs/data.md's three recipes run as written: each Python block writes the data, then its ``fit`` line
(with short-training overrides appended) trains through the entry point the command line calls, and the
log line on load says what was read and what was filled or dropped, with the right counts."""

from __future__ import annotations

import logging
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from nde_zoo.configs_path import config_dir
from nde_zoo.train import run

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "logger=none",
    "~callbacks",
    "strategy.solver=rk4",
    "strategy.steps=2",
]


def recipe(number: int) -> tuple[str, list[str]]:
    """The Python block and the ``fit`` overrides of recipe ``number``."""
    text = DOC.read_text()
    section = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, flags=re.S | re.M).group(0)
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip()
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "nde_zoo", "fit"], command
    return code, words[4:]


def fit(number: int, tmp_path, monkeypatch, caplog) -> tuple[list[dict], str]:
    code, overrides = recipe(number)
    monkeypatch.chdir(tmp_path)  # the recipe writes its file here, and the run's pictures go here
    exec(compile(code, f"docs/data.md recipe {number}", "exec"), {})
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("fit", overrides=[*overrides, *FAST])
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_checkpointing = False
    with caplog.at_level(logging.INFO, logger="nde_zoo"):
        results = run("fit", cfg)
    loads = [r.getMessage() for r in caplog.records if " read " in r.getMessage()]
    assert len(loads) == 1, loads
    return results, loads[0]


def test_classification_series_with_missing_values_and_own_times(tmp_path, monkeypatch, caplog):
    pytest.importorskip("torchcde")
    results, line = fit(1, tmp_path, monkeypatch, caplog)
    saved = np.load(tmp_path / "my_series.npz")
    observed = ~np.isnan(saved["times"])
    series = [saved["values"][i][observed[i]] for i in range(len(observed))]
    missing = [int(np.isnan(s).sum()) for s in series]
    total = sum(s.size for s in series)
    assert line.startswith(f"SeriesFileDataModule read {len(series)} series (")
    assert f"of 2 channel(s), lengths {min(map(len, series))}-{max(map(len, series))}, 2 classes" in line
    assert "times: the series' own" in line
    assert (
        f"missing values in the data: {sum(missing)} of {total}, in {sum(m > 0 for m in missing)} series"
        in line
    )
    assert f"filled {sum(missing)} by linear interpolation in time" in line and "model.in_channels=3" in line
    assert 0 <= results[0]["test/acc"] <= 1


def test_a_2d_density_from_a_npy(tmp_path, monkeypatch, caplog):
    results, line = fit(2, tmp_path, monkeypatch, caplog)
    assert line.startswith(
        "PointsFileDataModule read 3000 points of dimension 2 from my_points.npy; dropped 5 "
        "row(s) holding NaN or inf; split 2096 train, 300 validation, 599 test"
    )
    assert math.isfinite(results[0]["test/nll"]) and math.isfinite(results[0]["test/gmm_nll"])
    assert (tmp_path / "cnf_samples.png").is_file()


def test_a_latent_ode_on_irregular_samples(tmp_path, monkeypatch, caplog):
    results, line = fit(3, tmp_path, monkeypatch, caplog)
    saved = np.load(tmp_path / "my_irregular.npz")
    valid = ~np.isnan(saved["times"])
    values = saved["values"][valid]
    counts = valid.sum(1)
    assert line.startswith(
        f"IrregularFileDataModule read 200 series of 2 channel(s) from my_irregular.npz: "
        f"{counts.min()}-{counts.max()} observation times each on [0, 5]; "
        f"{int((~np.isnan(values)).sum())} of {values.size} values observed "
        f"({int(np.isnan(values).sum())} not observed: masked out, not filled)"
    )
    assert "the encoder reads t <= 2.5" in line and "model.data_dim=2" in line
    assert math.isfinite(results[0]["test/loss"])
    assert (tmp_path / "latent_ode_extrapolation.png").is_file()


def test_uea_logs_what_it_read_and_filled(caplog):
    """The embedded UEA set through the same log line: JapaneseVowels has no missing value."""
    pytest.importorskip("aeon")
    from nde_zoo.datamodules import UEADataModule

    with caplog.at_level(logging.INFO, logger="nde_zoo"):
        UEADataModule(missing_rate=0.3).setup()
    (line,) = [r.getMessage() for r in caplog.records if " read " in r.getMessage()]
    assert line.startswith(
        "UEADataModule read 640 series (270 train, 370 test) of 12 channel(s), lengths 7-29, "
        "9 classes, from aeon's embedded copy of JapaneseVowels; times: the knot grid"
    )
    assert "missing values in the data: 0 of " in line and "missing_rate=0.3 dropped " in line
    dropped = int(re.search(r"dropped (\d+) more", line).group(1))
    assert (
        dropped > 0 and f"filled {dropped} by linear interpolation" in line and "model.in_channels=13" in line
    )


def test_a_missing_file_says_how_to_give_yours(tmp_path):
    from nde_zoo.datamodules import IrregularFileDataModule, PointsFileDataModule, SeriesFileDataModule

    for module in (SeriesFileDataModule, PointsFileDataModule, IrregularFileDataModule):
        with pytest.raises(FileNotFoundError, match=r"does not exist; give your file with data\.path="):
            module(str(tmp_path / "nowhere.npz")).setup()
