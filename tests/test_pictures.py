"""Pictures that inform: the SDE draws sample paths against the data with the solver it really ran;
the NFE picture only where NFE varies; equal axes where geometry matters, labelled axes, and a title
naming the model, the strategy and the solver as run."""

from __future__ import annotations

import lightning
import pytest

from nde_zoo.datamodules import DigitsDataModule, SpiralsDataModule, Toy2DDataModule
from nde_zoo.models import CNF, LatentODE, ODEClassifier
from nde_zoo.pictures import nfe_varies, pyplot, run_title
from nde_zoo.strategies import Direct, Reversible

plt = pyplot()
pytestmark = pytest.mark.skipif(plt is None, reason="needs matplotlib (the [plots] extra)")


def _labelled(ax) -> bool:
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel())


def _fit(model, datamodule, tmp_path, steps=1):
    model.picture_dir = tmp_path
    trainer = lightning.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        inference_mode=False,
    )
    trainer.fit(model, datamodule)
    return trainer


def test_the_sde_draws_sample_paths_against_the_data_with_its_real_solver(tmp_path):
    pytest.importorskip("torchsde")
    from nde_zoo.models import SDEClassifier

    model = SDEClassifier(
        Direct(), state_dim=8, width=16
    )  # Direct's settings say dopri5; the SDE runs fixed dt
    data = DigitsDataModule(batch_size=64)
    _fit(model, data, tmp_path, steps=2)
    assert (tmp_path / "sde_paths.png").is_file()
    assert not (tmp_path / "nfe_curve.png").exists()  # fixed steps: the NFE never varies

    fig = model.paths_figure(data, plt, n_examples=3, n_paths=4)
    title = fig._suptitle.get_text()
    assert title.startswith("SDEClassifier (model=sde) with strategy=direct, torchsde ")
    assert "fixed dt=0.0625" in title and "dopri5" not in title
    left, right = fig.axes
    assert left.get_aspect() == 1.0 and _labelled(left) and _labelled(right)
    assert right.get_ylabel() == "p(true label | z(t))"
    paths = [line for line in left.get_lines() if len(line.get_xdata()) > 1]
    assert len(paths) == 3 * 4 and all(len(line.get_xdata()) == 17 for line in paths)  # t = 0, 1/16, ..., 1
    assert len(left.get_legend().get_texts()) == 3
    plt.close(fig)


def test_the_nfe_picture_only_where_nfe_varies():
    model = ODEClassifier(Direct("dopri5"), state_dim=4, width=8)
    model.strategy.history = [
        {"step": 0.0, "nfe/forward": 26.0, "nfe/backward": 0.0},
        {"step": 1.0, "nfe/forward": 26.0, "nfe/backward": 0.0},
    ]
    assert not nfe_varies(model.strategy.history) and model.nfe_figure(plt) is None
    model.strategy.history.append({"step": 2.0, "nfe/forward": 32.0, "nfe/backward": 0.0})
    fig = model.nfe_figure(plt)
    (ax,) = fig.axes
    assert ax.get_title() == (
        "ODEClassifier (model=ode_classifier) with strategy=direct, dopri5, adaptive, "
        "rtol=0.001, atol=1e-06: NFE per training step"
    )
    assert _labelled(ax) and [t.get_text() for t in ax.get_legend().get_texts()] == [
        "nfe/forward",
        "nfe/backward",
    ]
    plt.close(fig)


def test_titles_name_what_ran():
    model = CNF(Reversible("rk4", steps=4), width=8, depth=1)
    assert run_title(model) == "CNF (model=cnf) with strategy=reversible, rk4, 4 fixed steps"
    from nde_zoo.strategies import LocalERNODE

    ernode = ODEClassifier(LocalERNODE(inner="symplectic"), state_dim=4, width=8)
    assert "strategy=ernode around strategy=symplectic, dopri5, adaptive" in run_title(ernode)


def test_the_flow_picture_has_equal_labelled_axes(tmp_path):
    model = CNF(Reversible("rk4", steps=2), width=8, depth=1)
    data = Toy2DDataModule(n_train=64, n_val=16, n_test=64, batch_size=32)
    data.setup()
    fig = model.samples_figure(data, plt, n=64)
    assert fig._suptitle.get_text() == "CNF (model=cnf) with strategy=reversible, rk4, 2 fixed steps"
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 and all(ax.get_aspect() == 1.0 and _labelled(ax) for ax in panels)
    plt.close(fig)


def test_the_latent_ode_spirals_are_round_labelled_and_share_one_legend():
    model = LatentODE(
        Reversible("rk4", steps=4),
        data_dim=2,
        latent_dim=4,
        hidden_dim=8,
        field_width=8,
        decoder_width=8,
        encoder_width=8,
    )
    data = SpiralsDataModule(n_train=8, n_val=4, n_test=6, batch_size=4)
    fig = model.plot_series(data, plt)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 6 and all(ax.get_aspect() == 1.0 and _labelled(ax) for ax in panels)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "truth",
        "reconstruction",
        "extrapolation",
        "encoder input",
        "held out",
    ]
    assert fig._suptitle.get_text().startswith(
        "LatentODE (model=latent_ode) with strategy=reversible, rk4, 4 fixed"
    )
    plt.close(fig)
