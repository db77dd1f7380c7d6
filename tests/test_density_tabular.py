"""Tabular densities for the CNF: the embedded sets, the MAF loaders on tiny fixtures, malformed files."""

from __future__ import annotations

import lightning
import numpy as np
import pytest
import torch

from nde_zoo.datamodules import DensityTabularDataModule
from nde_zoo.datamodules.density_tabular import load_gas, load_miniboone, load_power, read_numeric_table
from nde_zoo.models import CNF
from nde_zoo.strategies import Reversible


@pytest.mark.parametrize("name, dim, n", [("wine", 13, 178), ("breast_cancer", 30, 569)])
def test_embedded_sets_are_split_and_standardised(name, dim, n):
    dm = DensityTabularDataModule(dataset=name)
    train, val, test = dm.split("train"), dm.split("val"), dm.split("test")
    assert dm.num_features == dim and len(train) + len(val) + len(test) == n
    assert train.mean(0).abs().max() < 1e-5 and (train.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert torch.equal(test, DensityTabularDataModule(dataset=name).split("test"))
    assert next(iter(dm.train_dataloader()))[0].shape == (min(128, len(train)), dim)


def _power_file(tmp_path, rows=100, cols=8):
    path = tmp_path / "power" / "data.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.random.default_rng(0).normal(size=(rows, cols)) * np.arange(1, cols + 1))
    return path


def test_power_follows_the_maf_preprocessing(tmp_path):
    path = _power_file(tmp_path)
    train, val, test = load_power(path)
    assert [len(train), len(val), len(test)] == [81, 9, 10] and train.shape[1] == 6  # columns 1 and 3 dropped
    both = np.vstack([train, val])
    assert np.abs(both.mean(0)).max() < 1e-10 and np.abs(both.std(0) - 1).max() < 1e-10
    again = load_power(path)
    assert all(
        np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True)
    )  # fixed shuffle and noise
    raw = np.load(path)
    kept = np.delete(np.delete(raw, 3, 1), 1, 1)
    # the last column (time) gets no noise: after standardising it is an affine map of a raw column
    last = np.concatenate([train, val, test])[:, 5]
    a, b = np.polyfit(np.sort(kept[:, 5]), np.sort(last), 1)
    assert np.abs(a * np.sort(kept[:, 5]) + b - np.sort(last)).max() < 1e-9
    noisy = np.concatenate([train, val, test])[:, 2]  # a sub-metering: uniform noise added
    a, b = np.polyfit(np.sort(kept[:, 2]), np.sort(noisy), 1)
    assert np.abs(a * np.sort(kept[:, 2]) + b - np.sort(noisy)).max() > 1e-3
    dm = DensityTabularDataModule(dataset="power", root=str(tmp_path), max_rows=50)
    assert dm.num_features == 6 and len(dm.split("train")) == 50


def test_power_with_the_wrong_shape_names_the_file(tmp_path):
    path = _power_file(tmp_path, cols=7)
    with pytest.raises(
        ValueError, match=r"power/data\.npy: expected a numeric \(N, 8\) array, got shape \(100, 7\)"
    ):
        load_power(path)


def _gas_table(rows=200):
    rng = np.random.default_rng(1)
    s = rng.normal(size=(rows, 5))
    twin = 2.0 * s[:, 1] + 0.01 * rng.normal(size=rows)  # correlates > 0.98 with s1
    names = ["Time", "Meth", "Eth", "s0", "s1", "s2", "s3", "s4", "twin"]
    data = np.column_stack([np.arange(rows), rng.random(rows), rng.random(rows), s, twin])
    return names, data


def test_gas_drops_labels_and_correlated_columns(tmp_path):
    names, data = _gas_table()
    path = tmp_path / "gas" / "ethylene_CO.csv"
    path.parent.mkdir(parents=True)
    path.write_text(
        ",".join(names) + "\n" + "\n".join(",".join(f"{v:.10g}" for v in row) for row in data) + "\n"
    )
    train, val, test = load_gas(path)
    assert train.shape[1] == 5 and [len(train), len(val), len(test)] == [162, 18, 20]
    full = np.vstack([train, val, test])
    assert np.abs(full.mean(0)).max() < 1e-10
    # s1 (the first of the correlated pair) went; its twin stayed
    assert np.allclose(np.corrcoef(full[:, 4], data[:, 8])[0, 1], 1.0)
    pd = pytest.importorskip("pandas")
    pickle = tmp_path / "gas" / "ethylene_CO.pickle"
    pd.DataFrame(data, columns=names).to_pickle(pickle)
    assert all(np.allclose(a, b) for a, b in zip(load_gas(pickle), (train, val, test), strict=True))
    dm = DensityTabularDataModule(dataset="gas", root=str(tmp_path))
    assert dm.file() == pickle and dm.num_features == 5


@pytest.mark.parametrize(
    "body, lineno, message",
    [
        ("1,2,3\n4,5\n", 3, "expected 3 fields, got 2"),
        ("1,2,3\n4,x5,6\n", 3, "field 'x5' is not a number"),
        ("", None, "no data rows"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, body, lineno, message):
    path = tmp_path / "table.csv"
    path.write_text("a,b,c\n" + body)
    where = rf"table\.csv:{lineno}: " if lineno else r"table\.csv: "
    with pytest.raises(ValueError, match=where + message):
        read_numeric_table(path, header=True)


def _miniboone_text(rows, counts=None):
    counts = counts or (len(rows) - 2, 2)
    lines = [f" {counts[0]} {counts[1]}"] + ["  " + " ".join(f"{v:.6e}" for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def test_miniboone_from_the_uci_text_and_from_npy(tmp_path):
    rows = np.random.default_rng(2).normal(size=(40, 50))
    rows[7, 3] = -999.0  # the missing-value marker: the row is dropped
    folder = tmp_path / "miniboone"
    folder.mkdir()
    (folder / "MiniBooNE_PID.txt").write_text(_miniboone_text(rows))
    train, val, test = load_miniboone(folder / "MiniBooNE_PID.txt")
    assert train.shape[1] == 50 and len(train) + len(val) + len(test) == 39 and len(test) == 3
    assert not np.isclose(
        np.vstack([train, val, test]), (-999.0 - rows[:, 3].mean()) / rows[:, 3].std()
    ).any()
    np.save(folder / "data.npy", np.delete(rows, 7, axis=0))
    dm = DensityTabularDataModule(dataset="miniboone", root=str(tmp_path))
    assert dm.file().name == "data.npy"
    assert np.allclose(dm.split("test").numpy(), test, atol=1e-6)


def test_malformed_miniboone_names_file_and_line(tmp_path):
    path = tmp_path / "MiniBooNE_PID.txt"
    rows = np.ones((4, 50))
    path.write_text("36499 93565 x\n")
    with pytest.raises(ValueError, match=r"MiniBooNE_PID\.txt:1: expected the two class counts"):
        load_miniboone(path)
    text = _miniboone_text(rows).splitlines()
    text[3] = text[3].rsplit(" ", 1)[0]  # a row with 49 numbers
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"MiniBooNE_PID\.txt:4: expected 50 fields, got 49"):
        load_miniboone(path)
    path.write_text(_miniboone_text(rows, counts=(3, 3)))
    with pytest.raises(ValueError, match=r"do not match the 4 data rows"):
        load_miniboone(path)


def test_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.dataset=wine"):
        DensityTabularDataModule(dataset="power", root=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="unknown tabular dataset 'hepmass'"):
        DensityTabularDataModule(dataset="hepmass")


def test_the_cnf_trains_on_wine_with_hutchinsons_trace(tmp_path):
    lightning.seed_everything(0)
    model = CNF(Reversible("rk4", steps=3), dim=13, width=16)
    assert not model.field.exact  # 13 > exact_trace_max_dim
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, DensityTabularDataModule(dataset="wine", batch_size=32))
    nll = trainer.test(model, DensityTabularDataModule(dataset="wine", batch_size=32), verbose=False)[0][
        "test/nll"
    ]
    assert np.isfinite(nll) and 5 < nll < 60
