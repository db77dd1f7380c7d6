"""The Neural CDE and its data: .ts/wav loaders on fixtures, preprocessing (time channel, fill-forward
padding, dropped observations, intensity), every ODE strategy, variable-length and irregular series."""

from __future__ import annotations

import math
import wave

import lightning
import numpy as np
import pytest
import torch

from nde_zoo.datamodules import CDESpiralsDataModule, SpeechCommandsDataModule, UEADataModule
from nde_zoo.datamodules.speech_commands import mfcc, read_wav
from nde_zoo.datamodules.timeseries import fill_missing, pad_forward
from nde_zoo.datamodules.uea import aeon_ships, read_ts
from nde_zoo.models import NeuralCDE
from nde_zoo.models.cde import ControlledField, interpolate
from nde_zoo.strategies import (
    Adjoint,
    Checkpoint,
    Direct,
    LocalERNODE,
    Reversible,
    Seminorm,
    Symplectic,
)

HEADER = """# a fixture in the UEA .ts format
@problemName Fixture
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b
@data
"""


def _series(rng, length):
    return rng.normal(size=(length, 2))


def _ts_line(series, label):
    return (
        ":".join(",".join("?" if np.isnan(v) else f"{v:.6f}" for v in series[:, c]) for c in range(2))
        + f":{label}"
    )


def write_ts(path, n, lengths, seed=0):
    rng = np.random.default_rng(seed)
    series = [_series(rng, lengths[i % len(lengths)]) for i in range(n)]
    labels = ["a" if i % 2 == 0 else "b" for i in range(n)]
    series[0][1, 0] = np.nan
    path.write_text(HEADER + "\n".join(_ts_line(s, y) for s, y in zip(series, labels, strict=True)) + "\n")
    return series, labels


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return lightning.Trainer(**{**defaults, **kwargs})


# -- loaders ----------------------------------------------------------------------------------
def test_read_ts_parses_variable_lengths_and_missing_values(tmp_path):
    series, labels = write_ts(tmp_path / "x.ts", 6, [5, 9, 3])
    got, got_labels = read_ts(tmp_path / "x.ts")
    assert got_labels == labels
    assert [s.shape for s in got] == [(5, 2), (9, 2), (3, 2)] * 2
    assert np.isnan(got[0][1, 0]) and np.allclose(np.nan_to_num(got[0]), np.nan_to_num(series[0]), atol=1e-6)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1,2,3:4,5,6:7,8,9:a", r"x\.ts:10: expected 2 channels \(@dimensions\), found 3"),
        ("1,2,x:4,5,6:a", r"x\.ts:10: a value is not a number"),
        ("1,2,3:4,5,6:c", r"x\.ts:10: class label 'c' is not one of @classLabel \['a', 'b'\]"),
        ("1,2,3:4,5:a", r"x\.ts:10: channels of one series differ in length: \[3, 2\]"),
    ],
)
def test_malformed_ts_names_file_and_line(tmp_path, line, message):
    (tmp_path / "x.ts").write_text(HEADER + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_ts(tmp_path / "x.ts")


def test_ts_without_data_or_with_timestamps_is_refused(tmp_path):
    (tmp_path / "x.ts").write_text("@problemName X\n@dimensions 2\n")
    with pytest.raises(ValueError, match=r"x\.ts: no @data section"):
        read_ts(tmp_path / "x.ts")
    (tmp_path / "x.ts").write_text("@problemName X\n@timeStamps true\n@data\n")
    with pytest.raises(ValueError, match=r"x\.ts:2: series with timestamps are not supported"):
        read_ts(tmp_path / "x.ts")
    (tmp_path / "x.ts").write_text("1,2:3,4:a\n")
    with pytest.raises(ValueError, match=r"x\.ts:1: expected a header line"):
        read_ts(tmp_path / "x.ts")


def _fixture_uea(tmp_path, **kwargs):
    folder = tmp_path / "Fixture"
    folder.mkdir(parents=True)
    train, _ = write_ts(folder / "Fixture_TRAIN.ts", 20, [5, 9, 3], seed=0)
    write_ts(folder / "Fixture_TEST.ts", 8, [4, 9], seed=1)
    dm = UEADataModule(name="Fixture", root=str(tmp_path), batch_size=4, val_fraction=0.25, **kwargs)
    dm.setup()
    return dm, train


def test_uea_fixture_knots_time_channel_and_fill_forward(tmp_path):
    dm, _ = _fixture_uea(tmp_path)
    assert dm.classes == ["a", "b"] and dm.num_classes == 2 and dm.num_channels == 3
    sizes = {k: len(v) for k, v in dm._splits.items()}
    assert sizes == {"train": 15, "val": 5, "test": 8}
    x = torch.cat([dm._splits[s].tensors[0] for s in ("train", "val", "test")])
    assert x.shape[1:] == (9, 3) and not torch.isnan(x).any()
    short = x[(x[:, -1, 0] < 1.0)]  # series shorter than 9: the time channel stops before 1
    assert len(short) > 0
    for series in short:
        end = int(torch.argmax(series[:, 0]))  # the last real knot
        assert torch.equal(series[end:], series[end].expand_as(series[end:]))  # filled forward, time included
        assert torch.allclose(series[: end + 1, 0], torch.arange(end + 1) / 8.0)


def test_dropped_observations_and_intensity_channels(tmp_path):
    dm, _ = _fixture_uea(tmp_path, missing_rate=0.4, intensity=True)
    x = dm._splits["train"].tensors[0]
    assert dm.num_channels == 1 + 2 + 2 and not torch.isnan(x).any()
    counts = x[..., 3:]  # running counts of observations per value channel
    assert (counts.diff(dim=1) >= 0).all() and (counts.diff(dim=1) <= 1).all()
    lengths = ((x[:, :, 0].diff(dim=1) > 0).sum(1) + 1).tolist()
    kept = [n - min(int(round(0.4 * n)), n - 1) for n in lengths]  # whole time points dropped
    assert counts[:, -1, 1].tolist() == kept
    clean, _ = _fixture_uea(tmp_path / "again", missing_rate=0.0, intensity=True)
    x = clean._splits["train"].tensors[0]
    lengths = (x[:, :, 0].diff(dim=1) > 0).sum(1) + 1
    assert torch.equal(x[:, -1, 4], lengths.float())  # nothing dropped: the count is the length


def test_fill_missing_interpolates_inside_and_holds_at_the_ends():
    filled = fill_missing(np.array([[np.nan], [1.0], [np.nan], [3.0], [np.nan]]))
    assert filled[:, 0].tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert pad_forward(np.array([[1.0, 2.0]]), 3).tolist() == [[1.0, 2.0]] * 3


def test_missing_uea_files_say_how_to_get_them(tmp_path):
    dm = UEADataModule(name="CharacterTrajectories", root=str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"CharacterTrajectories_TRAIN\.ts is missing; pass data\.download=true"
    ):
        dm.setup()


@pytest.mark.skipif(not aeon_ships("JapaneseVowels"), reason="aeon (the [cde] extra) is not installed")
def test_japanese_vowels_comes_from_aeon_without_download():
    dm = UEADataModule()
    dm.setup()
    assert dm.num_channels == 13 and dm.num_classes == 9
    assert {k: len(v) for k, v in dm._splits.items()} == {"train": 230, "val": 40, "test": 370}
    x = dm._splits["test"].tensors[0]
    assert x.shape[1] == 29
    lengths = (x[:, :, 0].diff(dim=1) > 0).sum(1) + 1
    assert int(lengths.min()) == 7 and int(lengths.max()) == 29


def _tone(path, freq, seconds=1.0):
    samples = (0.3 * np.sin(2 * math.pi * freq * np.arange(int(16000 * seconds)) / 16000) * 32767).astype(
        "<i2"
    )
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(samples.tobytes())


def test_speech_commands_loader_on_generated_wavs(tmp_path):
    for word, freq in (("yes", 300.0), ("no", 1200.0)):
        (tmp_path / word).mkdir()
        for i in range(4):
            _tone(tmp_path / word / f"{i}.wav", freq * (1 + 0.05 * i))
    _tone(tmp_path / "yes" / "short.wav", 300.0, seconds=0.5)  # skipped, as Kidger et al. do
    dm = SpeechCommandsDataModule(
        root=str(tmp_path), words=["yes", "no"], batch_size=2, val_fraction=0.25, test_fraction=0.25
    )
    dm.setup()
    x = torch.cat([dm._splits[s].tensors[0] for s in ("train", "val", "test")])
    assert x.shape == (8, 161, 21) and dm.classes == ["no", "yes"]
    # a low and a high tone differ in their cepstrum
    feats = mfcc(
        torch.from_numpy(
            np.stack([read_wav(tmp_path / "yes" / "0.wav"), read_wav(tmp_path / "no" / "0.wav")])
        )
    )
    assert feats.shape == (2, 161, 20) and (feats[0] - feats[1]).abs().mean() > 1.0


def test_bad_wav_files_are_named(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match=r"junk\.wav: not a readable wav file"):
        read_wav(tmp_path / "junk.wav")
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(b"\0" * 400)
    with pytest.raises(ValueError, match=r"stereo\.wav: expected mono 16-bit PCM, got 2 channel"):
        read_wav(tmp_path / "stereo.wav")
    with pytest.raises(FileNotFoundError, match=r"pass data\.download=true"):
        SpeechCommandsDataModule(root=str(tmp_path / "none")).setup()


# -- the model ----------------------------------------------------------------------------------
def test_field_is_an_ode_field_whose_only_parameters_are_g_theta():
    model = NeuralCDE(Direct("rk4", steps=4), in_channels=3, num_classes=2, hidden_dim=4, width=8)
    x = torch.randn(2, 6, 3, requires_grad=True)
    path = interpolate(x, "hermite")
    field = model.vector_field(path)
    assert isinstance(field, ControlledField)
    assert {id(p) for p in field.parameters()} == {id(p) for p in model.func.parameters()}
    assert not any(b.requires_grad for b in path.buffers())
    assert field(torch.tensor(1.5), torch.randn(2, 4)).shape == (2, 4)


def test_padding_by_filling_forward_converges_to_the_unpadded_answer():
    """A series padded by filling forward reaches the state it reaches at its own end.

    With linear interpolation the path is constant after the end, so the padded solve differs only
    because torchcde takes the left derivative at a knot: the first step after the end still sees
    the last piece. That is one step's worth, O(h), and vanishes as h -> 0.
    """
    torch.manual_seed(0)
    model = NeuralCDE(
        Direct("rk4", step_size=0.25),
        in_channels=3,
        num_classes=2,
        hidden_dim=4,
        width=8,
        interpolation="linear",
    ).double()
    short = torch.randn(1, 6, 3, dtype=torch.float64)
    padded = torch.cat([short, short[:, -1:].expand(1, 4, 3)], dim=1)
    gaps = []
    for h in (0.25, 0.0625, 0.015625):
        model.strategy = Direct("rk4", step_size=h)
        gaps.append(float((model.classify(short)[1].ys[-1] - model.classify(padded)[1].ys[-1]).abs().max()))
    assert gaps[1] < gaps[0] / 3 and gaps[2] < gaps[1] / 3 and gaps[2] < 5e-3, gaps


def test_shape_and_option_errors():
    model = NeuralCDE(Direct("rk4", steps=2), in_channels=13)
    with pytest.raises(
        ValueError, match=r"expects knots of shape \(batch, length >= 2, 13\) .* got \(2, 5, 4\)"
    ):
        model(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="interpolation must be one of hermite, cubic, linear"):
        NeuralCDE(Direct(), interpolation="spline")


def test_channel_mismatch_with_the_data_is_explained(tmp_path):
    dm, _ = _fixture_uea(tmp_path)
    model = NeuralCDE(Direct("rk4", steps=2), in_channels=13, num_classes=2)
    with pytest.raises(
        ValueError, match=r"num_channels=3 but model\.in_channels=13; pass model\.in_channels=3"
    ):
        _trainer(max_steps=1).fit(model, dm)


STRATEGIES = {
    "direct": lambda: Direct("rk4", steps=4),
    "checkpoint": lambda: Checkpoint("rk4", steps=4, snapshots=2),
    "adjoint": lambda: Adjoint("dopri5", rtol=1e-3, atol=1e-5),
    "seminorm": lambda: Seminorm("dopri5", rtol=1e-3, atol=1e-5),
    "reversible": lambda: Reversible("rk4", steps=4),
    "symplectic": lambda: Symplectic("dopri5", rtol=1e-3, atol=1e-5),
    "ernode": lambda: LocalERNODE(Direct("tsit5", rtol=1e-3, atol=1e-5)),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_ode_strategy_trains_the_cde(name, tmp_path):
    """Irregular (dropped observations, intensity) variable-length series, every ODE strategy."""
    lightning.seed_everything(0)
    dm, _ = _fixture_uea(tmp_path, missing_rate=0.3, intensity=True)
    model = NeuralCDE(STRATEGIES[name](), in_channels=5, num_classes=2, hidden_dim=4, width=8)
    before = [p.detach().clone() for p in model.func.parameters()]
    trainer = _trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, dm)
    assert trainer.global_step == 2
    after = list(model.func.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(
        not torch.equal(a, b) for a, b in zip(after, before, strict=True)
    )
    assert model.strategy.history[-1]["nfe/forward"] > 0


def test_exact_strategies_match_backprop_on_the_cde():
    """The interpolation is data: own-backward strategies find no hidden input and their gradients equal
    backprop through the same discretisation (Symplectic: plain RK; Reversible: the coupled recursion)."""
    from nde_zoo.solvers import Stepping
    from tests.test_reversible import reference_solve

    torch.manual_seed(1)
    model = NeuralCDE(Direct("rk4", steps=6), in_channels=3, num_classes=2, hidden_dim=4, width=8).double()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    path = interpolate(x, "hermite")
    field, ts = model.vector_field(path), path.interval
    y0 = model.initial(path.evaluate(ts[0])).detach().requires_grad_()
    inputs = [y0, *model.func.parameters()]

    def grads(ys):
        return torch.cat([g.flatten() for g in torch.autograd.grad(ys[-1].pow(2).sum(), inputs)])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    direct = grads(Direct("rk4", steps=6).solve(field, y0, ts).ys)
    assert rel(grads(Symplectic("rk4", steps=6).solve(field, y0, ts).ys), direct) < 1e-10
    reference = grads(reference_solve(field, y0, ts, "rk4", Stepping.of(steps=6), 0.999)[0])
    assert rel(grads(Reversible("rk4", steps=6).solve(field, y0, ts).ys), reference) < 1e-10


def test_irregular_variable_length_spirals_are_learned():
    lightning.seed_everything(0)
    dm = CDESpiralsDataModule(
        n_series=160,
        length=24,
        min_length=12,
        irregular=True,
        missing_rate=0.2,
        intensity=True,
        batch_size=32,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dm.setup()
    t = dm._splits["train"].tensors[0][..., 0]
    assert (t.diff(dim=1) >= 0).all() and not torch.allclose(
        t[0].diff()[:3], t[1].diff()[:3]
    )  # irregular times
    model = NeuralCDE(
        Direct("rk4", steps=23),
        in_channels=dm.num_channels,
        num_classes=2,
        hidden_dim=8,
        width=16,
        interpolation="linear",
        lr=2e-2,
    )
    trainer = _trainer(max_epochs=12)
    trainer.fit(model, dm)
    assert trainer.test(model, dm, verbose=False)[0]["test/acc"] >= 0.85


@pytest.mark.timeout(300)
def test_cli_fit_cde_with_seminorm(cli, tmp_path):
    result = cli(
        "fit",
        "model=cde",
        "strategy=seminorm",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        "model.hidden_dim=8",
        "model.width=8",
        "data.batch_size=32",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout + result.stderr
