"""Latent ODEs for irregularly sampled time series (Rubanova, Chen & Duvenaud, NeurIPS 2019).

A variational autoencoder over time series:

* the **encoder** reads the observations *backwards* in time and returns a Gaussian
  ``q(z0 | x) = N(mean, std^2)``. The ODE-RNN encoder (the paper's) evolves its GRU state
  between observations with an ODE and updates it at each observation; the plain GRU
  encoder (``encoder="gru"``, the paper's RNN baseline) instead reads the time gap as an
  extra input;
* the **decoder** solves a latent ODE ``dz/dt = f(z)`` from ``z0 ~ q`` at ``t = 0`` to every
  observation time *with the model's gradient strategy* (``self.solve``) and maps each latent
  state to the data space;
* the **loss** is the negative ELBO: a Gaussian log-likelihood of the observed values (fixed
  ``obs_std``) minus ``KL(q(z0) || N(0, I))``.

Batches hold series observed at different times: they are put on the union of their
observation times with masks (:mod:`nde_zoo.datamodules.irregular`), so one solve serves the
batch and a series is scored only where it was observed. The encoder reads the observations
up to the dataset's split time (``batch.encode_mask``); the decoder is scored on all of them,
so the error on the points after the split is an extrapolation error. Logged per stage:
``loss``, ``elbo`` (nats per series), ``kl``, ``mse`` (reconstruction: the points the encoder
read), ``extrap_mse`` (the points it did not), ``nfe`` (forward evaluations of the decoder).

Validation and test decode from the posterior mean (deterministic figures; the ELBO logged
there is the plug-in value at the mean), training from one reparametrised sample.

The encoder's ODE between observations is stepped with a fixed-step RK method of the solver
core (``encoder_solver``, at most ``encoder_step_size`` per step; Euler, as in the paper's
code) and differentiated by plain backprop: the intervals are short and the GRU state small.
The gradient strategy governs the decoder's solve, the long one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from nde_zoo.datamodules.irregular import IrregularBatch, collate_irregular
from nde_zoo.models.base import NeuralDE
from nde_zoo.solvers import get_tableau, rk_step
from nde_zoo.strategies.base import GradientStrategy, Solution

__all__ = ["LatentODE", "LatentField", "ODERNNEncoder", "Posterior"]


class Posterior(NamedTuple):
    """``q(z0) = N(mean, std^2)``, each ``(batch, latent_dim)``."""

    mean: Tensor
    std: Tensor


class LatentField(nn.Module):
    """The decoder's autonomous latent dynamics ``dz/dt = f(z)``: an MLP with ELU activations.

    Shapes: ``z`` ``(batch, latent_dim)`` -> ``(batch, latent_dim)``; ``t`` (0-d) is unused.
    """

    def __init__(self, latent_dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, width),
            nn.ELU(),
            nn.Linear(width, width),
            nn.ELU(),
            nn.Linear(width, latent_dim),
        )

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class _HiddenField(nn.Module):
    """The ODE-RNN's dynamics of its GRU state between observations (tanh MLP)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, hidden))

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        return self.net(h)


class ODERNNEncoder(nn.Module):
    """Read a batch backwards in time into ``q(z0)`` at ``t = 0``.

    Args:
        channels: data channels ``D``; the GRU reads ``[values * mask, mask]`` (``2 D``) and,
            for the plain GRU, the time gap (``+1``).
        hidden: GRU state size.
        latent_dim: size of ``z0``.
        mode: ``"odernn"`` (ODE evolution between observations) or ``"gru"`` (gap as input).
        width: hidden width of the ODE-RNN's field.
        solver / step_size: fixed-step RK method and largest step of the ODE-RNN's evolution.

    A series' state stays zero until its last observation is read and is updated only at
    its own observations, so a series is encoded the same whatever other series share its
    batch (up to round-off for ``"gru"``; up to the evolution's discretisation for ``"odernn"``).
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        latent_dim: int,
        mode: str = "odernn",
        width: int = 32,
        solver: str = "euler",
        step_size: float = 0.25,
    ) -> None:
        super().__init__()
        if mode not in ("odernn", "gru"):
            raise ValueError(f"encoder must be 'odernn' or 'gru', got {mode!r}")
        if step_size <= 0:
            raise ValueError(f"encoder_step_size must be positive, got {step_size}")
        self.mode, self.step_size = mode, step_size
        self.tableau = get_tableau(solver)
        self.cell = nn.GRUCell(2 * channels + (mode == "gru"), hidden)
        self.field = _HiddenField(hidden, width) if mode == "odernn" else None
        self.to_posterior = nn.Linear(hidden, 2 * latent_dim)

    def _evolve(self, h: Tensor, t0: float, t1: float) -> Tensor:
        """Carry ``h`` from ``t0`` to ``t1`` (``t1 < t0``) with fixed RK steps of size ``<= step_size``."""
        n = max(1, math.ceil(abs(t1 - t0) / self.step_size - 1e-9))
        dt = (t1 - t0) / n
        for i in range(n):
            h = rk_step(self.field, h.new_tensor(t0 + i * dt), h, dt, self.tableau).y
        return h

    def forward(self, times: Tensor, values: Tensor, mask: Tensor) -> Posterior:
        """``times`` ``(T,)``, ``values``/``mask`` ``(batch, T, D)`` -> :class:`Posterior` at ``t = 0``."""
        batch, n = values.shape[:2]
        m = mask.to(values.dtype)
        inputs = torch.cat([values * m, m], dim=-1)  # (batch, T, 2D)
        observed = mask.any(dim=-1)  # (batch, T)
        h = values.new_zeros(batch, self.cell.hidden_size)
        seen = torch.zeros(batch, 1, dtype=torch.bool, device=values.device)  # read an observation yet?
        last = values.new_zeros(batch, 1)  # time of the series' latest read observation (gru)
        tl = times.tolist()
        t_prev = tl[-1] if n else 0.0
        for i in reversed(range(n)):
            t = tl[i]
            if self.field is not None and t != t_prev:
                h = torch.where(seen, self._evolve(h, t_prev, t), h)
            x = inputs[:, i]
            if self.mode == "gru":
                x = torch.cat([x, torch.where(seen, last - t, torch.zeros_like(last))], dim=-1)
            obs = observed[:, i, None]
            h = torch.where(obs, self.cell(x, h), h)
            if self.mode == "gru":
                last = torch.where(obs, torch.full_like(last, t), last)
            seen = seen | obs
            t_prev = t
        if self.field is not None and t_prev != 0.0:
            h = torch.where(seen, self._evolve(h, t_prev, 0.0), h)
        elif self.mode == "gru":  # one last read: how far the first observation lies from t = 0
            x = torch.cat(
                [
                    values.new_zeros(batch, self.cell.input_size - 1),
                    torch.where(seen, last, torch.zeros_like(last)),
                ],
                dim=-1,
            )
            h = self.cell(x, h)
        mean, raw = self.to_posterior(h).chunk(2, dim=-1)
        return Posterior(mean, nn.functional.softplus(raw) + 1e-4)


class LatentODE(NeuralDE):
    """Latent ODE (Rubanova et al. 2019) trained by the ELBO; the decoder's solve uses the strategy.

    Args:
        strategy: the gradient strategy of the decoder's solve.
        data_dim: channels of the series (2 for the spirals).
        latent_dim: size of ``z0``.
        hidden_dim: GRU state size of the encoder.
        field_width: hidden width of the latent field ``f`` (two hidden layers).
        field: the latent field ``f(t, z) -> dz/dt`` on ``(batch, latent_dim)`` (an ``nn.Module`` or a
            config with ``_target_``); None builds :class:`LatentField` ``(latent_dim, field_width)``.
        decoder_width: hidden width of the readout ``z -> x`` (one hidden layer).
        encoder: ``"odernn"`` (Rubanova et al.) or ``"gru"`` (time gaps as inputs).
        encoder_width: hidden width of the ODE-RNN's field.
        encoder_solver / encoder_step_size: fixed-step method and largest step of the ODE-RNN.
        obs_std: standard deviation of the Gaussian likelihood.
        kl_warmup_steps: the KL term's weight rises linearly from 0 to 1 over this many
            training steps (0: always 1); validation and test always use 1.
        lr / weight_decay: AdamW.
        lr_final_factor: the learning rate follows a cosine from ``lr`` to ``lr * lr_final_factor``
            over the run (1: constant).
    """

    config_name = "latent_ode"

    def __init__(
        self,
        strategy: GradientStrategy,
        data_dim: int = 2,
        latent_dim: int = 4,
        hidden_dim: int = 32,
        field_width: int = 32,
        decoder_width: int = 32,
        encoder: str = "odernn",
        encoder_width: int = 32,
        encoder_solver: str = "euler",
        encoder_step_size: float = 0.25,
        obs_std: float = 0.1,
        kl_warmup_steps: int = 0,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        lr_final_factor: float = 0.1,
        field: nn.Module | dict | None = None,
    ) -> None:
        super().__init__(strategy, lr=lr, weight_decay=weight_decay, lr_final_factor=lr_final_factor)
        if obs_std <= 0:
            raise ValueError(f"obs_std must be positive, got {obs_std}")
        self.data_dim, self.latent_dim, self.obs_std = data_dim, latent_dim, obs_std
        self.kl_warmup_steps = kl_warmup_steps
        self.encoder = ODERNNEncoder(
            data_dim, hidden_dim, latent_dim, encoder, encoder_width, encoder_solver, encoder_step_size
        )
        self.field = self.build_field(field, lambda: LatentField(latent_dim, field_width))
        self.readout = nn.Sequential(
            nn.Linear(latent_dim, decoder_width), nn.ReLU(), nn.Linear(decoder_width, data_dim)
        )

    # -- hooks a downstream project may override ---------------------------------------------
    def vector_field(self) -> nn.Module:
        """The latent dynamics the decoder integrates."""
        return self.field

    def encode(self, batch: IrregularBatch) -> Posterior:
        """``q(z0)`` from the observations the encoder may read (``batch.encode_mask``)."""
        return self.encoder(batch.times, batch.values, batch.encode_mask)

    def decode(self, z0: Tensor, times: Tensor) -> tuple[Tensor, Solution | None]:
        """Predictions ``(batch, len(times), data_dim)`` from ``z0`` ``(batch, latent_dim)`` at ``t = 0``.

        The latent ODE is solved with the model's strategy from 0 to every time of ``times``
        (1-D, strictly increasing, ``>= 0``); the Solution is ``None`` when only ``t = 0`` is asked.
        """
        if times.dim() != 1 or len(times) == 0:
            raise ValueError(f"decode needs a non-empty 1-D tensor of times, got shape {tuple(times.shape)}")
        if float(times[0]) < 0:
            raise ValueError(f"observation times must be >= 0 (z0 lives at t = 0), got {float(times[0])}")
        offset = int(float(times[0]) > 0)
        ts = torch.cat([times.new_zeros(1), times]) if offset else times
        if len(ts) == 1:
            return self.readout(z0)[:, None], None
        solution = self.solve(self.vector_field(), z0, ts.to(z0))
        zs = solution.ys[offset:].transpose(0, 1)  # (batch, T, latent_dim)
        return self.readout(zs), solution

    def loss(
        self, batch: IrregularBatch, predicted: Tensor, posterior: Posterior, kl_weight: float = 1.0
    ) -> dict[str, Tensor]:
        """The negative ELBO per observed value (``"loss"``) and its parts.

        Returns ``{"loss", "elbo" (batch,), "log_likelihood" (batch,), "kl" (batch,)}``; the
        ELBO is ``log p(x | z0) - KL(q(z0) || N(0, I))`` in nats per series.
        """
        m = batch.mask.to(predicted.dtype)
        z = (batch.values - predicted) / self.obs_std
        log_lik = ((-0.5 * z.pow(2) - math.log(self.obs_std) - 0.5 * math.log(2 * math.pi)) * m).sum(
            dim=(1, 2)
        )
        mean, std = posterior
        kl = (0.5 * (mean.pow(2) + std.pow(2) - 1.0) - torch.log(std)).sum(dim=1)
        elbo = log_lik - kl
        count = m.sum().clamp_min(1.0)
        return {
            "loss": -(log_lik - kl_weight * kl).sum() / count,
            "elbo": elbo,
            "log_likelihood": log_lik,
            "kl": kl,
        }

    # -- the rest ---------------------------------------------------------------------------
    def forward(self, batch: IrregularBatch) -> Tensor:
        """Predictions ``(batch, T, data_dim)`` at ``batch.times`` from the posterior mean."""
        return self.decode(self.encode(batch).mean, batch.times)[0]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        features = getattr(datamodule, "num_features", None)
        if features is not None and features != self.data_dim:
            raise ValueError(
                f"the data has {features} channels but model.data_dim={self.data_dim}; "
                f"pass model.data_dim={features}"
            )

    def _kl_weight(self, stage: str) -> float:
        if stage != "train" or self.kl_warmup_steps <= 0:
            return 1.0
        return min(1.0, (self.global_step + 1) / self.kl_warmup_steps)

    def _common_step(self, batch: IrregularBatch, stage: str) -> Tensor:
        if batch.values.shape[-1] != self.data_dim:
            raise ValueError(
                f"LatentODE(data_dim={self.data_dim}) got series with {batch.values.shape[-1]} channels; "
                f"pass model.data_dim={batch.values.shape[-1]}"
            )
        posterior = self.encode(batch)
        z0 = posterior.mean
        if stage == "train":
            z0 = z0 + posterior.std * torch.randn_like(z0)
        predicted, solution = self.decode(z0, batch.times)
        parts = self.loss(batch, predicted, posterior, self._kl_weight(stage))
        loss = parts["loss"]
        if stage == "train" and solution is not None:  # inference pays nothing for regularisation
            loss = loss + self.strategy.regularisation(solution)
        n = len(batch.values)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", batch_size=n)
        self.log(f"{stage}/elbo", parts["elbo"].mean(), batch_size=n)
        self.log(f"{stage}/kl", parts["kl"].mean(), batch_size=n)
        sq = (predicted.detach() - batch.values).pow(2)
        for name, where in (("mse", batch.encode_mask), ("extrap_mse", batch.mask & ~batch.encode_mask)):
            count = int(where.sum())
            if count:
                # Logged only when the batch has such points, so not synced across ranks: a rank that
                # saw none all epoch would skip the all-reduce the others wait in (a DDP hang).
                self.log(
                    f"{stage}/{name}",
                    sq[where].mean(),
                    prog_bar=True,
                    on_step=False,
                    on_epoch=True,
                    batch_size=count,
                    sync_dist=False,
                )
        nfe = float(solution.stats.nfe_forward) if solution is not None else 0.0
        self.log(f"{stage}/nfe", nfe, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def predict_step(self, batch: IrregularBatch, batch_idx: int) -> Tensor:
        return self(batch)

    # -- the picture at the end of fit --------------------------------------------------------
    def on_fit_end(self) -> None:
        super().on_fit_end()
        out = self.output_dir()
        datamodule = getattr(self.trainer, "datamodule", None)
        if out is None or self.trainer.global_rank != 0 or datamodule is None:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the [plots] extra is optional
            return
        fig = self.plot_series(datamodule, plt)
        if fig is not None:
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / "latent_ode_extrapolation.png", dpi=110)
            plt.close(fig)

    @torch.no_grad()
    def plot_series(self, datamodule: Any, plt: Any, n_series: int = 6, split: str = "test") -> Any:
        """A figure of reconstructions (solid) and extrapolations (dashed) of ``n_series`` series."""
        datamodule.setup("test")
        dataset = datamodule.dataset(split) if hasattr(datamodule, "dataset") else None
        if dataset is None or len(dataset) == 0:
            return None
        indices = list(range(min(n_series, len(dataset))))
        records = [dataset[i] for i in indices]
        t_split, t_end = float(datamodule.t_split), float(datamodule.t_end)
        batch = collate_irregular(records, t_split)
        batch = IrregularBatch(*(x.to(self.device) for x in batch))
        was_training = self.training
        self.eval()
        dense = torch.linspace(0.0, t_end, 200, device=self.device)
        path = self.decode(self.encode(batch).mean, dense)[0].cpu()  # (n, 200, D)
        self.train(was_training)
        dense = dense.cpu()
        cols = 3
        rows = math.ceil(len(indices) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
        before = dense <= t_split
        planar = False
        for k, (ax, record) in enumerate(zip(axes.flat, records, strict=False)):
            seen = record.times <= t_split
            if self.data_dim == 2 and hasattr(datamodule, "truth"):  # a trajectory in the plane
                truth = datamodule.truth(split, indices[k], dense)
                ax.plot(truth[:, 0], truth[:, 1], color="0.6", lw=1, label="truth")
                ax.plot(path[k, before, 0], path[k, before, 1], color="tab:blue", label="reconstruction")
                ax.plot(
                    path[k, ~before, 0], path[k, ~before, 1], "--", color="tab:orange", label="extrapolation"
                )
                ax.scatter(
                    record.values[seen, 0], record.values[seen, 1], s=8, color="k", label="encoder input"
                )
                ax.scatter(
                    record.values[~seen, 0],
                    record.values[~seen, 1],
                    s=8,
                    marker="x",
                    color="tab:red",
                    label="held out",
                )
                ax.set_aspect("equal")  # a spiral is a shape: one unit is as long on both axes
                ax.set_xlabel("x1 (channel 0)")
                ax.set_ylabel("x2 (channel 1)")
                planar = True
            else:  # channels against time: the two most observed
                counts = record.mask.sum(0)
                for c, color in zip(
                    counts.argsort(descending=True)[:2].tolist(), ("tab:blue", "tab:green"), strict=False
                ):
                    obs = record.mask[:, c]
                    ax.plot(dense[before], path[k, before, c], color=color)
                    ax.plot(dense[~before], path[k, ~before, c], "--", color=color)
                    ax.scatter(
                        record.times[obs], record.values[obs, c], s=8, color=color, label=f"channel {c}"
                    )
                ax.axvline(t_split, color="0.5", lw=0.8)
                ax.set_xlabel("t")
                ax.set_ylabel("value")
                ax.legend(fontsize=6)
            ax.set_title(f"{split} series {indices[k]}", fontsize=8)
        for ax in list(axes.flat)[len(records) :]:
            ax.axis("off")
        if planar:  # the same five entries in every panel: one legend for the figure
            handles, labels = axes.flat[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
        from nde_zoo.pictures import run_title

        what = f"reconstruction (solid) and extrapolation (dashed) beyond t = {t_split:g}"
        fig.suptitle(run_title(self, what), fontsize=8)
        fig.tight_layout(rect=(0, 0.05 if planar else 0, 1, 1))
        return fig
