"""The latent ODE: every strategy, exact gradients through the decoder, mixed observation times,
the ELBO's parts, the spirals and PhysioNet data (fixtures, malformed files), the picture, the CLI."""

from __future__ import annotations

import math
import os
import tarfile
from pathlib import Path

import lightning
import pytest
import torch

from nde_zoo.datamodules import PhysioNetDataModule, SpiralsDataModule
from nde_zoo.datamodules.irregular import IrregularBatch, IrregularRecord, collate_irregular
from nde_zoo.datamodules.physionet import VARIABLES, parse_record
from nde_zoo.datamodules.spirals import spiral_points
from nde_zoo.models import LatentODE
from nde_zoo.models.latent_ode import ODERNNEncoder
from nde_zoo.solvers import integrate, rk_increment
from nde_zoo.strategies import (
    Adjoint,
    Checkpoint,
    Direct,
    LocalERNODE,
    ODEStrategy,
    Reversible,
    Seminorm,
    Solution,
    Symplectic,
)

F64 = torch.float64
FIXTURE = Path(__file__).parent / "fixtures" / "physionet"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "latent_ode_laplace"
STRATEGIES = {
    "direct": lambda: Direct("rk4", steps=4),
    "checkpoint": lambda: Checkpoint("rk4", steps=4, snapshots=2),
    "adjoint": lambda: Adjoint("dopri5", rtol=1e-3, atol=1e-5),
    "seminorm": lambda: Seminorm("dopri5", rtol=1e-3, atol=1e-5),
    "reversible": lambda: Reversible("rk4", steps=4),
    "symplectic": lambda: Symplectic("dopri5", rtol=1e-3, atol=1e-5),
    "ernode": lambda: LocalERNODE(Reversible("rk4", steps=4)),
}
SMALL = dict(latent_dim=3, hidden_dim=8, field_width=8, decoder_width=8, encoder_width=8)


def tiny_spirals(**kw) -> SpiralsDataModule:
    args = dict(n_train=20, n_val=10, n_test=10, n_grid=20, n_obs=8, batch_size=10)
    return SpiralsDataModule(**{**args, **kw})


def trainer(tmp_path, logger=False, **kw) -> lightning.Trainer:
    args = dict(
        accelerator="cpu",
        max_steps=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    return lightning.Trainer(**{**args, **kw})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_trains_with_every_ode_strategy(name, tmp_path):
    lightning.seed_everything(0)
    model = LatentODE(STRATEGIES[name](), **SMALL)
    before = [p.detach().clone() for p in model.field.parameters()]
    trainer(tmp_path).fit(model, tiny_spirals())
    assert all(
        not torch.equal(a, p) for a, p in zip(before, model.field.parameters(), strict=True)
    )  # the decoder learned
    assert model.strategy.history and model.strategy.history[-1]["nfe/forward"] > 0
    if name not in ("direct",):  # own backward passes count their field evaluations
        assert model.strategy.history[-1]["nfe/backward"] > 0
    results = trainer(tmp_path).test(model, tiny_spirals(), verbose=False)[0]
    assert all(math.isfinite(results[f"test/{k}"]) for k in ("loss", "elbo", "mse", "extrap_mse"))


def _batch(n=4, seed=0, dtype=torch.float32) -> IrregularBatch:
    dm = tiny_spirals(n_train=n, seed=seed)
    data = dm.dataset("train")
    batch = collate_irregular([data[i] for i in range(n)], dm.t_split)
    return IrregularBatch(batch.times.to(dtype), batch.values.to(dtype), batch.mask, batch.encode_mask)


def _grads(model: LatentODE, batch: IrregularBatch) -> list[torch.Tensor]:
    model.zero_grad()
    posterior = model.encode(batch)
    predicted, _ = model.decode(posterior.mean + 0.1 * posterior.std, batch.times)
    model.loss(batch, predicted, posterior)["loss"].backward()
    return [p.grad.clone() for p in model.parameters()]


class ReversibleBackprop(ODEStrategy):
    """McCallum & Foster's coupled recursion with autograd on: what Reversible's gradient must equal."""

    def solve(self, field, y0, ts):
        lam = 0.999

        def step(t, state, h, carry):
            y, z = state
            y1 = lam * y + (1 - lam) * z + rk_increment(field, t, z, h, self.tableau)[0]
            return (y1, z - rk_increment(field, t + h, y1, -h, self.tableau)[0]), None, None

        outs, path, stats = integrate(step, (y0, y0), lambda s: s[0], ts.tolist(), ts[0], self.stepping, 4)
        return Solution(torch.stack(outs), ts, stats, path)


@pytest.mark.parametrize("name", ["checkpoint", "reversible", "symplectic"])
def test_exact_strategies_give_backprops_gradient_through_the_whole_model(name):
    torch.manual_seed(0)
    reference_strategy = (
        ReversibleBackprop("rk4", steps=6) if name == "reversible" else Direct("rk4", steps=6)
    )
    model = LatentODE(reference_strategy, **SMALL).double()
    batch = _batch(dtype=F64)
    reference = _grads(model, batch)
    model.strategy = {
        "checkpoint": Checkpoint("rk4", steps=6, snapshots=3),
        "reversible": Reversible("rk4", steps=6),
        "symplectic": Symplectic("rk4", steps=6),
    }[name]
    for g, r in zip(_grads(model, batch), reference, strict=True):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12), (g - r).abs().max()


def test_batches_put_series_with_different_times_on_the_union_with_masks():
    a = IrregularRecord(
        torch.tensor([0.0, 0.5, 1.5]),
        torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        torch.tensor([[True, True], [True, False], [True, True]]),
    )
    b = IrregularRecord(
        torch.tensor([0.25, 0.5, 2.0]),
        torch.tensor([[7.0, 8.0], [9.0, 9.5], [10.0, 11.0]]),
        torch.ones(3, 2, dtype=torch.bool),
    )
    batch = collate_irregular([a, b], t_split=1.0)
    assert batch.times.tolist() == [0.0, 0.25, 0.5, 1.5, 2.0]
    assert batch.mask[:, :, 0].tolist() == [
        [True, False, True, True, False],
        [False, True, True, False, True],
    ]
    assert batch.values[0, 2].tolist() == [3.0, 0.0]  # unobserved channel zeroed
    assert batch.values[1, 2].tolist() == [9.0, 9.5]
    assert batch.encode_mask[:, :, 0].tolist() == [
        [True, False, True, False, False],
        [False, True, True, False, False],
    ]


def test_a_series_is_encoded_and_decoded_the_same_whatever_shares_its_batch():
    torch.manual_seed(0)
    data = tiny_spirals(n_train=6).dataset("train")
    alone = collate_irregular([data[0]], 2.0)
    mixed = collate_irregular([data[i] for i in range(6)], 2.0)
    assert len(mixed.times) > len(alone.times)  # the others add times
    own = torch.searchsorted(mixed.times, alone.times)
    # the plain GRU encoder: the same posterior up to round-off
    gru = ODERNNEncoder(2, 8, 3, mode="gru").double()
    qa = gru(alone.times.double(), alone.values.double(), alone.encode_mask)
    qm = gru(mixed.times.double(), mixed.values.double(), mixed.encode_mask)
    assert torch.allclose(qa.mean[0], qm.mean[0], rtol=0, atol=1e-14)
    assert torch.allclose(qa.std[0], qm.std[0], rtol=0, atol=1e-14)
    # the ODE-RNN and the decoder: the same up to their discretisations (fine steps, tight tolerance)
    model = LatentODE(
        Direct("dopri5", rtol=1e-9, atol=1e-11), encoder_solver="rk4", encoder_step_size=0.01, **SMALL
    ).double()
    alone64 = IrregularBatch(alone.times.double(), alone.values.double(), alone.mask, alone.encode_mask)
    mixed64 = IrregularBatch(mixed.times.double(), mixed.values.double(), mixed.mask, mixed.encode_mask)
    with torch.no_grad():
        qa, qm = model.encode(alone64), model.encode(mixed64)
        assert torch.allclose(qa.mean[0], qm.mean[0], atol=1e-7)
        pa, pm = model(alone64), model(mixed64)
    assert torch.allclose(pa[0], pm[0, own], atol=1e-7)
    # and the loss ignores whatever sits where a series was not observed
    posterior = model.encode(mixed64)
    noisy = mixed64._replace(
        values=torch.where(mixed64.mask, mixed64.values, torch.full_like(mixed64.values, 1e3))
    )
    with torch.no_grad():
        assert model.loss(mixed64, pm, posterior)["loss"] == model.loss(noisy, pm, posterior)["loss"]


def test_elbo_parts_match_torch_distributions():
    torch.manual_seed(0)
    model = LatentODE(Direct("rk4", steps=3), obs_std=0.3, **SMALL).double()
    batch = _batch(dtype=F64)
    posterior = model.encode(batch)
    predicted = model.decode(posterior.mean, batch.times)[0]
    parts = model.loss(batch, predicted, posterior)
    normal = torch.distributions.Normal(predicted, 0.3)
    expected_ll = (normal.log_prob(batch.values) * batch.mask).sum(dim=(1, 2))
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    expected_kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(parts["log_likelihood"], expected_ll) and torch.allclose(parts["kl"], expected_kl)
    assert torch.allclose(parts["loss"], -(expected_ll - expected_kl).sum() / batch.mask.sum())


def test_decoding_starts_at_zero_and_reports_bad_times():
    model = LatentODE(Direct("rk4", steps=4), **SMALL)
    z0 = torch.randn(2, 3)
    late, _ = model.decode(z0, torch.tensor([0.5, 1.0]))  # z0 lives at t = 0 even if the first time is later
    full, _ = model.decode(z0, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(late, full[:, 1:], atol=1e-6) and not torch.allclose(full[:, 0], full[:, 1])
    with pytest.raises(ValueError, match=">= 0"):
        model.decode(z0, torch.tensor([-0.5, 1.0]))
    with pytest.raises(ValueError, match="encoder must be 'odernn' or 'gru'"):
        LatentODE(Direct("rk4", steps=2), encoder="lstm")
    with pytest.raises(ValueError, match="model.data_dim=2"):
        trainer(Path("."), max_steps=1).fit(
            LatentODE(Direct("rk4", steps=2), data_dim=3, **SMALL), tiny_spirals()
        )


def test_spirals_are_fixed_irregular_and_noisy_versions_of_both_spirals():
    a, b = tiny_spirals(n_train=40), tiny_spirals(n_train=40)
    ra, rb = a.dataset("train"), b.dataset("train")
    assert all(
        torch.equal(x.values, y.values) and torch.equal(x.times, y.times) for x, y in zip(ra, rb, strict=True)
    )
    times = {tuple(r.times.tolist()) for r in ra}
    assert len(times) == 40  # every series has its own observation times
    assert all(len(r.times) == 8 and (r.times.diff() > 0).all() for r in ra)
    directions = [cw for _, cw in a._params["train"]]
    assert 0 < sum(directions) < 40  # clockwise and counter-clockwise
    residual = torch.cat([r.values - a.truth("train", i, r.times) for i, r in enumerate(ra)])
    assert abs(float(residual.std()) - 0.1) < 0.02 and abs(float(residual.mean())) < 0.03
    assert a.t_split == 2.0 and not torch.equal(
        ra[0].values, tiny_spirals(n_train=40, seed=1).dataset("train")[0].values
    )
    # counter-clockwise: the angle grows with u; clockwise: it shrinks
    u = torch.linspace(1.0, 1.5, 2).numpy()
    ccw, cw = spiral_points(u, False) - [5.0, 0.0], spiral_points(u, True) + [5.0, 0.0]
    cross = lambda p: p[0, 0] * p[1, 1] - p[0, 1] * p[1, 0]  # noqa: E731
    assert cross(ccw) > 0 > cross(cw)


# -- PhysioNet -------------------------------------------------------------------------------
def test_physionet_record_parsing_averages_bins_and_drops_missing_descriptors():
    path = FIXTURE / "set-a" / "132540.txt"
    rid, times, values, mask = parse_record(path.read_text().splitlines(), str(path))
    assert rid == "132540" and times[0] == 0.0 and (times[1:] > times[:-1]).all()
    hr = VARIABLES.index("HR")
    assert values[list(times).index(0.5), hr] == 89.0  # 00:31 and 00:32 share the 0.5 h bin
    assert mask[0, VARIABLES.index("Height")] and values[0, VARIABLES.index("Weight")] == 76.0
    assert list(times).index(12.0) and values[list(times).index(12.0), VARIABLES.index("Weight")] == 80.6
    _, t2, v2, m2 = parse_record((FIXTURE / "set-a" / "132539.txt").read_text().splitlines(), "x")
    assert not m2[0, VARIABLES.index("Height")] and not m2[0, VARIABLES.index("Weight")]  # -1: missing
    _, t3, _, m3 = parse_record(path.read_text().splitlines(), "x", variables=("HR",), quantization_hours=0)
    assert m3.shape[1] == 1 and math.isclose(t3[1], 32 / 60)  # no rounding: 00:31 and 00:32 apart


def _physionet(root, **kw) -> PhysioNetDataModule:
    return PhysioNetDataModule(
        root=str(root), **{**dict(batch_size=2, val_fraction=0.25, test_fraction=0.25), **kw}
    )


def test_physionet_loads_the_fixture_from_a_folder_or_the_archive(tmp_path):
    dm = _physionet(FIXTURE)
    dm.setup()
    assert dm.num_features == 41 and [len(dm.dataset(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    assert sorted(sum(dm.record_ids.values(), [])) == ["132539", "132540", "132541", "132543"]
    train = [dm.dataset("train")[i] for i in range(2)]
    assert all(r.times.max() <= 1.0 for r in train)  # 48 h -> [0, 1]
    values, mask = torch.cat([r.values for r in train]), torch.cat([r.mask for r in train])
    seen = mask.sum(0) > 1
    means = (values * mask).sum(0)[seen] / mask.sum(0)[seen]
    assert means.abs().max() < 1e-5  # standardised on the training split
    batch = next(iter(dm.train_dataloader()))
    assert batch.values.shape[0] == 2 and batch.values.shape[2] == 41
    assert (batch.encode_mask == (batch.mask & (batch.times <= 0.5)[None, :, None])).all()
    archive = tmp_path / "set-a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(FIXTURE / "set-a", arcname="set-a")
    for root in (archive, tmp_path):
        other = _physionet(root)
        other.setup()
        assert other.record_ids == dm.record_ids
        assert all(
            torch.equal(x.values, y.values)
            for x, y in zip(other.dataset("test"), dm.dataset("test"), strict=True)
        )
    small = _physionet(FIXTURE, max_records=2, val_fraction=0.0, test_fraction=0.5)
    small.setup()
    assert sorted(sum(small.record_ids.values(), [])) == ["132539", "132540"]


@pytest.mark.parametrize(
    "line, lineno, message",
    [
        ("00:07,HR", 3, "expected 3 comma-separated fields"),
        ("7h,HR,73", 3, "bad time '7h'"),
        ("00:07,HR,fast", 3, "value 'fast' of HR is not a number"),
        ("00:07,HR,nan", 3, "value 'nan' of HR is not finite"),
        ("00:07,Heartbeat,73", 3, "unknown parameter 'Heartbeat'"),
    ],
)
def test_malformed_physionet_files_name_the_file_and_line(tmp_path, line, lineno, message):
    folder = tmp_path / "set-a"
    folder.mkdir()
    bad = folder / "000001.txt"
    bad.write_text(f"Time,Parameter,Value\n00:00,RecordID,1\n{line}\n")
    with pytest.raises(ValueError, match=rf"000001\.txt:{lineno}: {message}"):
        _physionet(tmp_path).setup()


def test_physionet_bad_header_and_missing_data(tmp_path):
    (tmp_path / "1.txt").write_text("Parameter,Time,Value\n")
    with pytest.raises(ValueError, match=r"1\.txt:1: expected the header"):
        _physionet(tmp_path).setup()
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        _physionet(tmp_path / "nowhere").setup()
    with pytest.raises(ValueError, match="unknown PhysioNet variables"):
        PhysioNetDataModule(variables=["HR", "Pulse"])


def test_trains_on_physionet_and_draws_its_picture(tmp_path):
    lightning.seed_everything(0)
    model = LatentODE(Direct("rk4", steps=4), data_dim=41, **SMALL)
    logger = lightning.pytorch.loggers.CSVLogger(str(tmp_path))
    trainer(tmp_path, logger=logger).fit(model, _physionet(FIXTURE))
    assert (Path(logger.log_dir) / "latent_ode_extrapolation.png").is_file()


def test_fit_draws_reconstructions_and_extrapolations(tmp_path):
    lightning.seed_everything(0)
    model = LatentODE(Reversible("rk4", steps=4), **SMALL)
    logger = lightning.pytorch.loggers.CSVLogger(str(tmp_path))
    trainer(tmp_path, logger=logger).fit(model, tiny_spirals())
    picture = Path(logger.log_dir) / "latent_ode_extrapolation.png"
    assert picture.is_file() and picture.stat().st_size > 20_000


# -- through the CLI -------------------------------------------------------------------------
TINY = [
    "strategy.solver=rk4",
    "strategy.steps=3",
    "strategy.rtol=null",
    "strategy.atol=null",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "data.n_train=20",
    "data.n_val=10",
    "data.n_test=10",
    "data.batch_size=10",
]


def test_cli_fit_writes_the_picture(cli, tmp_path):
    out = cli(
        "fit",
        "model=latent_ode",
        "strategy=reversible",
        *TINY,
        "model.hidden_dim=8",
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert next(
        (tmp_path / "outputs").glob("fit/latent_ode/*/latent_ode_extrapolation.png")
    ).is_file()


def test_downstream_example_trains_from_the_cli(cli, tmp_path):
    out = cli(
        "fit",
        "model=laplace_latent_ode",
        "strategy=symplectic",
        *TINY,
        f"hydra.searchpath=[file://{EXAMPLE / 'configs'}]",
        "hydra.run.dir=" + str(tmp_path / "run"),
        cwd=EXAMPLE,
        env={"PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LaplaceLatentODE" in out.stdout + out.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "latent_ode_extrapolation.png").is_file()


def test_downstream_example_overrides_only_the_likelihood(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from laplace_latent import LaplaceLatentODE

    torch.manual_seed(0)
    model = LaplaceLatentODE(Direct("rk4", steps=3), obs_std=0.2, **SMALL).double()
    batch = _batch(dtype=F64)
    posterior = model.encode(batch)
    predicted = model.decode(posterior.mean, batch.times)[0]
    laplace = torch.distributions.Laplace(predicted, 0.2 / math.sqrt(2.0))
    expected = (laplace.log_prob(batch.values) * batch.mask).sum(dim=(1, 2))
    assert torch.allclose(model.loss(batch, predicted, posterior)["log_likelihood"], expected)
    assert not torch.allclose(LatentODE.loss(model, batch, predicted, posterior)["log_likelihood"], expected)


def test_gradcheck_takes_the_latent_odes_batches():
    from nde_zoo.fidelity import gradient_fidelity

    errors = gradient_fidelity(lambda s: LatentODE(s, **SMALL), Symplectic("rk4", steps=5), _batch())
    assert set(errors) == {"encoder", "field", "readout", "all"} and errors["all"] < 1e-10, errors
