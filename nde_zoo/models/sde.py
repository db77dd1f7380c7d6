"""Neural SDEs on torchsde: a classifier (Pal et al. 2023) and a latent SDE (Li et al. 2020).

Both solve Stratonovich SDEs with diagonal noise through ``strategy.solve_sde`` (the routes
are in :mod:`nde_zoo.strategies.sde`: ``direct`` -> ``sdeint``, ``adjoint`` ->
``sdeint_adjoint``, ``reversible`` -> reversible Heun with its exact adjoint), with fixed
steps of ``dt`` unless the strategy has fixed steps of its own.

Noise: every solve draws its Brownian sample from a ``torchsde.BrownianInterval`` seeded
with a key derived from ``(noise_seed, global rank, stage, epoch, batch index, call)``: a
run is reproducible, a resumed run continues with the noise it would have drawn, the
backward pass replays the forward's sample, and under DDP each rank draws different noise
(``seed_everything`` alone gives every rank the same ``randn``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from nde_zoo.models.base import NeuralDE, float32_solve
from nde_zoo.strategies.base import GradientStrategy, Solution
from nde_zoo.strategies.sde import brownian

__all__ = ["NeuralSDEModel", "SDEClassifier", "LatentSDE", "ClassifierSDE", "LatentPosteriorSDE"]

_STAGES = {"train": 0, "val": 1, "test": 2, "predict": 3, "call": 4}


class NeuralSDEModel(NeuralDE):
    """Base of the SDE models: seeded per-rank noise and the call into ``strategy.solve_sde``.

    Args:
        strategy: ``direct``, ``adjoint``, ``reversible`` or ``ernode`` (others have no SDE form).
        dt: the SDE step when the strategy is adaptive (SDEs are solved with fixed steps).
        noise_seed: base seed of the Brownian samples.
        lr / weight_decay: AdamW.
    """

    kind = "sde"

    def __init__(
        self, strategy: GradientStrategy, dt: float, noise_seed: int, lr: float, weight_decay: float
    ) -> None:
        super().__init__(strategy, lr=lr, weight_decay=weight_decay)
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        self.dt = float(dt)
        self.noise_seed = int(noise_seed)
        self._noise_key: tuple[int, ...] = (_STAGES["call"], 0, 0)
        self._calls = 0

    # -- noise -------------------------------------------------------------------------------
    def _set_noise_key(self, stage: str, batch_idx: int) -> None:
        epoch = self.current_epoch if self._trainer is not None else 0
        self._noise_key, self._calls = (_STAGES[stage], epoch, batch_idx), 0

    def noise_entropy(self) -> int:
        """The seed of the next Brownian sample (distinct per rank, stage, epoch, batch and call)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        key = [self.noise_seed, rank, *self._noise_key, self._calls]
        self._calls += 1
        if self._noise_key[0] == _STAGES["call"]:  # plain calls outside a Trainer: a fresh sample each time
            self._noise_key = (_STAGES["call"], 0, self._noise_key[2] + 1)
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    def solve_sde(self, sde: nn.Module, y0: Tensor, ts: Tensor) -> Solution:
        """Solve ``sde`` from ``y0`` with outputs at ``ts`` on a fresh seeded Brownian sample."""
        with float32_solve(y0, ts) as (y0, ts):  # mixed precision: the SDE solve stays float32
            t0, t1 = float(ts[0]), float(ts[-1])
            bm = brownian(t0, t1, y0, self.noise_entropy(), dt=self.dt)
            return self.strategy.solve_sde(sde, y0, ts, bm, dt=self.dt)

    # -- Lightning ---------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._set_noise_key("train", batch_idx)
        return self._common_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._set_noise_key("val", batch_idx)
        return self._common_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._set_noise_key("test", batch_idx)
        return self._common_step(batch, "test")

    def solve(self, field: Any, y0: Tensor, ts: Tensor) -> Solution:
        raise TypeError(f"{type(self).__name__} solves SDEs: use solve_sde(sde, y0, ts)")

    # -- the picture at the end of fit ---------------------------------------------------------
    #: the file :meth:`paths_figure`'s picture is written to, in the run directory.
    picture_name = "sde_paths.png"

    def paths_figure(self, datamodule: Any, plt: Any) -> Any:
        """Sampled paths against the data (each model draws its own); None: no picture."""
        return None

    def on_fit_end(self) -> None:
        """The base's NFE picture (only where NFE varies), then sampled paths against the data."""
        super().on_fit_end()
        out = self.output_dir()
        datamodule = getattr(self.trainer, "datamodule", None)
        if out is None or datamodule is None or self.trainer.global_rank != 0:
            return
        from nde_zoo.pictures import pyplot

        plt = pyplot()
        if plt is None:
            return
        fig = self.paths_figure(datamodule, plt)
        if fig is not None:
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / self.picture_name, dpi=110)
            plt.close(fig)

    def _picture_grid(self, t0: float, t1: float) -> Tensor:
        """Output times on the solve's own step grid from ``t0`` to ``t1`` (a path, not just its end)."""
        from nde_zoo.strategies.sde import sde_step_size

        try:
            step = sde_step_size(getattr(self.strategy, "inner", self.strategy), [t0, t1], self.dt)
        except (AttributeError, ValueError):
            step = self.dt
        n = max(1, round((t1 - t0) / step))
        if abs(n * step - (t1 - t0)) > 1e-6 * step:
            return torch.tensor([t0, t1])
        return torch.linspace(t0, t1, n + 1)


class ClassifierSDE(nn.Module):
    """``dz = f(t, z) dt + g(z) o dW``: MLP drift with time as an input, diagonal diffusion.

    ``f(t, z) = W2 tanh(W1 [z, t] + b1) + b2``; ``g(z) = noise_scale * sigmoid(W z + b)``
    elementwise (one noise channel per state channel). Shapes ``(batch, state_dim)``.
    """

    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, state_dim: int, width: int, noise_scale: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(state_dim + 1, width)
        self.out = nn.Linear(width, state_dim)
        self.diffusion = nn.Linear(state_dim, state_dim)
        self.noise_scale = noise_scale

    def f(self, t: Tensor, z: Tensor) -> Tensor:
        tt = t.to(z).expand(z.shape[0], 1)
        return self.out(torch.tanh(self.hidden(torch.cat([z, tt], dim=-1))))

    def g(self, t: Tensor, z: Tensor) -> Tensor:
        return self.noise_scale * torch.sigmoid(self.diffusion(z))


class SDEClassifier(NeuralSDEModel):
    """Pal et al.'s Neural SDE classifier: input -> linear to ``state_dim`` -> SDE on ``[0, t1]`` -> head.

    Args:
        strategy: an SDE-capable gradient strategy.
        in_features: input size (64 for 8x8 digits, 784 for MNIST).
        num_classes: output classes.
        state_dim: the SDE state (the input is downsampled to it; 32 as Pal et al.).
        width: hidden width of the drift MLP (64 as Pal et al.).
        noise_scale: the largest diffusion per channel.
        t1: the SDE is solved on ``[0, t1]``.
        dt: fixed SDE step (``t1 / dt`` steps) unless the strategy has fixed steps.
        noise_seed / lr / weight_decay: see :class:`NeuralSDEModel`.
        field: the SDE (``f(t, z)``, ``g(t, z)``, ``noise_type``, ``sde_type`` as torchsde's; an
            ``nn.Module`` or a config with ``_target_``); None builds :class:`ClassifierSDE`.

    One Brownian sample per example and solve (validation and test too: their accuracy is
    that of one sampled path, reproducible through the seed).
    """

    config_name = "sde"

    def __init__(
        self,
        strategy: GradientStrategy,
        in_features: int = 64,
        num_classes: int = 10,
        state_dim: int = 32,
        width: int = 64,
        noise_scale: float = 0.5,
        t1: float = 1.0,
        dt: float = 0.0625,
        noise_seed: int = 0,
        lr: float = 1e-2,
        weight_decay: float = 5e-2,
        field: nn.Module | dict | None = None,
    ) -> None:
        super().__init__(strategy, dt=dt, noise_seed=noise_seed, lr=lr, weight_decay=weight_decay)
        self.in_features = in_features
        self.embed = nn.Linear(in_features, state_dim)
        self.sde = self.build_field(field, lambda: ClassifierSDE(state_dim, width, noise_scale))
        self.head = nn.Linear(state_dim, num_classes)
        self.register_buffer("ts", torch.tensor([0.0, t1]), persistent=False)
        self.metrics = nn.ModuleDict(
            {
                stage: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train_", "val_", "test_")
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(batch, in_features)`` -> logits ``(batch, num_classes)`` (one sampled path)."""
        return self.classify(x)[0]

    def classify(self, x: Tensor) -> tuple[Tensor, Solution]:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"SDEClassifier expects inputs of shape (batch, {self.in_features}), got {tuple(x.shape)}; "
                "set model.in_features to the data's feature count"
            )
        z0 = self.embed(x)
        solution = self.solve_sde(self.sde, z0, self.ts.to(z0))
        return self.head(solution.ys[-1]), solution

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        features = getattr(datamodule, "num_features", None)
        if features is not None and features != self.in_features:
            raise ValueError(
                f"the data gives {features} features per example but model.in_features={self.in_features}; "
                f"pass model.in_features={features}"
            )

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._set_noise_key("predict", batch_idx)
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=-1)

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        logits, solution = self.classify(x)
        loss = nn.functional.cross_entropy(logits, y)
        if stage == "train":
            loss = loss + self.strategy.regularisation(solution)
        metric = self.metrics[f"{stage}_"]
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", batch_size=len(y))
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(
            f"{stage}/nfe", float(solution.stats.nfe_forward), on_step=False, on_epoch=True, batch_size=len(y)
        )
        return loss

    @torch.no_grad()
    def paths_figure(self, datamodule: Any, plt: Any, n_examples: int = 5, n_paths: int = 8) -> Any:
        """``n_paths`` sampled state paths of ``n_examples`` test examples of different classes.

        Left: the paths of ``z(t)`` projected on the two principal directions of the final states
        (equal axes; o where every path of an example starts, x where each ends), coloured by the
        example's label. Right: the probability the head gives the true label along each path, which
        the model is trained to make large at ``t1``.
        """
        from nde_zoo.pictures import run_title

        x, y = next(iter(datamodule.test_dataloader()))
        picked = [int((y == c).nonzero()[0]) for c in torch.unique(y)[:n_examples]]
        x, y = x[picked].to(self.device), y[picked].to(self.device)
        xs, labels = x.repeat_interleave(n_paths, 0), y.repeat_interleave(n_paths, 0)
        was_training = self.training
        self.eval()
        self._set_noise_key("predict", 0)
        ts = self._picture_grid(float(self.ts[0]), float(self.ts[-1])).to(xs)
        solution = self.solve_sde(self.sde, self.embed(xs), ts)
        self.train(was_training)
        zs = solution.ys.cpu()  # (T, examples * paths, state)
        p_true = torch.softmax(self.head(solution.ys), -1).gather(
            -1, labels.expand(len(ts), -1).unsqueeze(-1)).squeeze(-1).cpu()
        final = zs[-1] - zs[-1].mean(0)
        directions = torch.linalg.svd(final, full_matrices=False).Vh[:2].T  # (state, 2)
        plane = (zs - zs[-1].mean(0)) @ directions  # (T, paths, 2)
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
        for e, label in enumerate(y.tolist()):
            color = f"C{e % 10}"
            for b in range(e * n_paths, (e + 1) * n_paths):
                left.plot(plane[:, b, 0], plane[:, b, 1], color=color, lw=0.8, alpha=0.7,
                          label=f"label {label}" if b == e * n_paths else None)
                left.plot(plane[-1, b, 0], plane[-1, b, 1], "x", color=color, ms=4)
                right.plot(ts.cpu(), p_true[:, b], color=color, lw=0.8, alpha=0.7)
            left.plot(plane[0, e * n_paths, 0], plane[0, e * n_paths, 1], "o", color=color, ms=5)
        left.set_aspect("equal")
        left.set_xlabel("z on principal direction 1")
        left.set_ylabel("z on principal direction 2")
        left.set_title(f"{n_paths} sampled paths of z(t) per test example (o start, x end)", fontsize=8)
        left.legend(fontsize=7)
        right.set_xlabel("t")
        right.set_ylabel("p(true label | z(t))")
        right.set_ylim(0, 1)
        right.set_title("the head's probability of the true label along each path", fontsize=8)
        title = run_title(self, "sampled paths against the data", sde=solution.extras.get("sde"))
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        return fig


class LatentPosteriorSDE(nn.Module):
    """The latent SDE's posterior, with the path KL carried in the state.

    State ``y = [z (latent), c (context), k (1)]``, ``(batch, latent + context + 1)``:

        dz = h(t, z, c) dt + sigma(z) o dW     (posterior drift, conditioned on the context c)
        dc = 0                                   (the encoder's summary, held fixed)
        dk = |(h(t, z, c) - f(t, z)) / sigma(z)|^2 / 2 dt   (Girsanov: KL of posterior vs prior)

    ``f`` is the prior drift, ``sigma(z) = noise_scale * sigmoid(W z + b)`` the diagonal
    diffusion shared by both (so the Ito-Stratonovich corrections cancel in ``h - f``). The
    context travels in the state rather than being closed over, so its gradient reaches the
    encoder through ``y0`` under every strategy (a closed-over tensor would be refused).
    """

    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, latent_dim: int, context_dim: int, width: int, noise_scale: float) -> None:
        super().__init__()
        self.latent_dim, self.context_dim = latent_dim, context_dim
        self.posterior = nn.Sequential(
            nn.Linear(latent_dim + context_dim + 1, width), nn.Softplus(), nn.Linear(width, latent_dim)
        )
        self.prior = nn.Sequential(
            nn.Linear(latent_dim + 1, width), nn.Softplus(), nn.Linear(width, latent_dim)
        )
        self.diffusion = nn.Linear(latent_dim, latent_dim)
        self.noise_scale = noise_scale

    def split(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d, c = self.latent_dim, self.context_dim
        return y[:, :d], y[:, d : d + c], y[:, d + c :]

    def sigma(self, z: Tensor) -> Tensor:
        return self.noise_scale * torch.sigmoid(self.diffusion(z))

    def prior_drift(self, t: Tensor, z: Tensor) -> Tensor:
        return self.prior(torch.cat([z, t.to(z).expand(z.shape[0], 1)], dim=-1))

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        z, c, _ = self.split(y)
        tt = t.to(z).expand(z.shape[0], 1)
        h = self.posterior(torch.cat([z, c, tt], dim=-1))
        u = (h - self.prior_drift(t, z)) / self.sigma(z)
        return torch.cat([h, torch.zeros_like(c), 0.5 * u.pow(2).sum(-1, keepdim=True)], dim=-1)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        z, c, k = self.split(y)
        return torch.cat([self.sigma(z), torch.zeros_like(c), torch.zeros_like(k)], dim=-1)


class _PriorSDE(nn.Module):
    """The prior ``dz = f(t, z) dt + sigma(z) o dW`` alone, for sampling (shares the posterior's modules)."""

    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, posterior: LatentPosteriorSDE) -> None:
        super().__init__()
        self.posterior = posterior

    def f(self, t: Tensor, z: Tensor) -> Tensor:
        return self.posterior.prior_drift(t, z)

    def g(self, t: Tensor, z: Tensor) -> Tensor:
        return self.posterior.sigma(z)


class LatentSDE(NeuralSDEModel):
    """A latent SDE VAE for series (Li et al. 2020, "Scalable gradients for SDEs", section 7).

    A GRU reads the series backwards into ``q(z0 | x)`` and a context; the posterior SDE
    (:class:`LatentPosteriorSDE`) runs over the observation times; a linear decoder gives the
    mean of a Gaussian likelihood. The loss is the negative ELBO per observation:
    ``(-sum log p(x_i | z(t_i)) + KL(q(z0) || N(0, I)) + KL(path)) / (T * obs_dim)``.

    Args:
        strategy: an SDE-capable gradient strategy.
        obs_dim: channels of the observations.
        latent_dim / context_dim: sizes of ``z`` and of the encoder's context.
        width: hidden width of the drift MLPs; encoder_hidden: GRU size.
        noise_scale: the largest diffusion per latent channel.
        obs_std: std of the Gaussian likelihood.
        dt: the SDE step (made a power-of-two fraction of the observation spacing, so the
            observation times lie on the step grid, as reversible Heun needs).
        noise_seed / lr / weight_decay: see :class:`NeuralSDEModel`.
        field: the posterior SDE, with :class:`LatentPosteriorSDE`'s interface (an ``nn.Module`` or a
            config with ``_target_``); None builds one.
    """

    config_name = "latent_sde"

    def __init__(
        self,
        strategy: GradientStrategy,
        obs_dim: int = 1,
        latent_dim: int = 4,
        context_dim: int = 8,
        width: int = 64,
        encoder_hidden: int = 32,
        noise_scale: float = 0.5,
        obs_std: float = 0.1,
        dt: float = 0.03125,
        noise_seed: int = 0,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        field: nn.Module | dict | None = None,
    ) -> None:
        super().__init__(strategy, dt=dt, noise_seed=noise_seed, lr=lr, weight_decay=weight_decay)
        self.obs_dim, self.latent_dim, self.obs_std = obs_dim, latent_dim, obs_std
        self.encoder = nn.GRU(obs_dim + 1, encoder_hidden, batch_first=True)
        self.to_q = nn.Linear(encoder_hidden, 2 * latent_dim + context_dim)
        self.sde = self.build_field(field, lambda: LatentPosteriorSDE(latent_dim, context_dim, width, noise_scale))
        self.decoder = nn.Linear(latent_dim, obs_dim)
        self._requested_dt = self.dt

    def _grid_dt(self, ts: Tensor) -> float:
        spacing = float(ts[1] - ts[0]) if len(ts) > 1 else float(ts[-1] - ts[0])
        k = max(0, math.ceil(math.log2(spacing / self._requested_dt - 1e-9)))
        return spacing / 2**k

    def encode(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q(z0 | x)`` mean and log-variance ``(batch, latent)`` and the context ``(batch, context)``."""
        inputs = torch.cat([x, t.unsqueeze(-1)], dim=-1).flip(1)  # read backwards: z0 summarises the future
        _, h = self.encoder(inputs)
        mean, logvar, context = self.to_q(h[-1]).split(
            [self.latent_dim, self.latent_dim, self.sde.context_dim], -1
        )
        return mean, logvar, context

    def elbo_terms(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Solution]:
        """Per-series ``(log-likelihood, KL(z0), KL(path))`` and the posterior solve."""
        if x.dim() != 3 or x.shape[-1] != self.obs_dim or t.shape != x.shape[:2]:
            raise ValueError(
                f"LatentSDE expects t (batch, T) and x (batch, T, {self.obs_dim}), got {tuple(t.shape)} and "
                f"{tuple(x.shape)}"
            )
        ts = t[0]
        if not torch.equal(t, ts.expand_as(t)):
            raise ValueError("LatentSDE needs the same observation times in every series of a batch")
        mean, logvar, context = self.encode(t, x)
        eps = torch.randn(mean.shape, generator=self._generator(mean), dtype=mean.dtype, device=mean.device)
        z0 = mean + eps * (0.5 * logvar).exp()
        y0 = torch.cat([z0, context, z0.new_zeros(z0.shape[0], 1)], dim=-1)
        self.dt = self._grid_dt(ts)
        solution = self.solve_sde(self.sde, y0, ts)
        z, _, k = self.sde.split(solution.ys.reshape(-1, y0.shape[-1]))
        z = z.view(len(ts), -1, self.latent_dim)  # (T, batch, latent)
        predicted = self.decoder(z).transpose(0, 1)  # (batch, T, obs_dim)
        log_lik = torch.distributions.Normal(predicted, self.obs_std).log_prob(x).sum((1, 2))
        kl0 = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        kl_path = k.view(len(ts), -1)[-1]
        return log_lik, kl0, kl_path, solution

    def _generator(self, like: Tensor) -> torch.Generator:
        generator = torch.Generator(device=like.device)
        generator.manual_seed(self.noise_entropy())
        return generator

    def reconstruct(self, t: Tensor, x: Tensor) -> Tensor:
        """Decoded posterior path ``(batch, T, obs_dim)`` for the observed series."""
        _, _, _, solution = self.elbo_terms(t, x)
        z = solution.ys[..., : self.latent_dim]
        return self.decoder(z).transpose(0, 1)

    def sample_prior(self, ts: Tensor, n: int) -> Tensor:
        """``n`` decoded prior paths ``(n, len(ts), obs_dim)`` from ``z0 ~ N(0, I)``."""
        z0 = torch.randn(n, self.latent_dim, generator=self._generator(ts), device=ts.device, dtype=ts.dtype)
        self.dt = self._grid_dt(ts)
        solution = self.solve_sde(_PriorSDE(self.sde), z0, ts)
        return self.decoder(solution.ys).transpose(0, 1)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._set_noise_key("predict", batch_idx)
        return self.reconstruct(*batch)

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        t, x = batch
        log_lik, kl0, kl_path, solution = self.elbo_terms(t, x)
        per_obs = x.shape[1] * x.shape[2]
        loss = (-log_lik + kl0 + kl_path).mean() / per_obs
        if stage == "train":
            loss = loss + self.strategy.regularisation(solution)
        z = solution.ys[..., : self.latent_dim]
        mse = (self.decoder(z).transpose(0, 1) - x).pow(2).mean()
        n = len(x)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", batch_size=n)
        self.log(f"{stage}/mse", mse, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{stage}/kl", (kl0 + kl_path).mean() / per_obs, on_step=False, on_epoch=True, batch_size=n)
        self.log(
            f"{stage}/nfe", float(solution.stats.nfe_forward), on_step=False, on_epoch=True, batch_size=n
        )
        return loss

    picture_name = "latent_sde.png"

    @torch.no_grad()
    def paths_figure(self, datamodule: Any, plt: Any, n_series: int = 4) -> Any:
        """Validation series (dots) with their posterior paths, and prior samples, channel 0 against time."""
        from nde_zoo.pictures import run_title

        t, x = next(iter(datamodule.val_dataloader()))
        t, x = t[:n_series].to(self.device), x[:n_series].to(self.device)
        self._set_noise_key("predict", 0)
        _, _, _, solution = self.elbo_terms(t, x)
        recon = self.decoder(solution.ys[..., : self.latent_dim]).transpose(0, 1).cpu()
        prior = self.sample_prior(t[0], n_series).cpu()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for i in range(len(x)):
            axes[0].plot(t[0].cpu(), x[i, :, 0].cpu(), "o", ms=3, color=f"C{i}")
            axes[0].plot(t[0].cpu(), recon[i, :, 0], "-", color=f"C{i}")
            axes[1].plot(t[0].cpu(), prior[i, :, 0], "-", color=f"C{i}")
        axes[0].set_title("data (dots) and posterior sample paths", fontsize=9)
        axes[1].set_title("prior sample paths", fontsize=9)
        for ax in axes:
            ax.set_xlabel("t")
        axes[0].set_ylabel("x (channel 0)")
        fig.suptitle(run_title(self, sde=solution.extras.get("sde")), fontsize=8)
        fig.tight_layout()
        return fig
