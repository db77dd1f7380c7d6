"""A neural PDE by the method of lines: a field on a periodic grid, a convolutional vector field,
trained through whole rollouts.

The state is a field ``u`` of shape ``(batch, channels, *grid)`` on a periodic grid of ``dim`` = 1
or 2 dimensions (``points`` per dimension over a side ``length``). Its time derivative is a small
convolutional network with circular padding (periodic boundaries), either

* the whole right-hand side (``known="none"``): ``du/dt = net(u)``, or
* a learned correction added to a known part (``known="diffusion"``): ``du/dt = D lap_h u + net(u)``,
  with ``lap_h`` the second-order finite-difference Laplacian (periodic) and ``D`` the known
  diffusion coefficient of each channel, or (``known="dispersion"``: KdV in 1-D, Zakharov-Kuznetsov
  in 2-D) ``du/dt = -c disp_h u + net(u)``, ``disp_h`` the second-order central difference of
  ``u_xxx`` (1-D) or of ``(u_xx + u_yy)_x`` (2-D, ``x`` the last axis) and ``c`` the known dispersion.
  The correction's last layer starts at zero, so the untrained model is the known physics.

A training example is a window of observations ``u(t_0), ..., u(t_K)``; the model rolls out from
``u(t_0)`` through every observation time in one solve with the gradient strategy, and the loss is
the mean squared error over all of them: a rollout of ``N = t_K / dt`` solver steps, observed at
the data's times. Validation and test roll out whole trajectories (a horizon several times the
training window) and log ``rel_error``, the relative L2 error averaged over the horizon, and
``final_rel_error`` at its end.

Stepping: a rollout is a fixed number of solver steps. A strategy given with fixed steps
(``strategy.steps=`` or ``strategy.step_size=``) keeps them; an adaptive one (every strategy
config's default) is rebuilt with the same arguments but ``solver`` and ``step_size=dt`` (so
``strategy=reversible`` trains a midpoint rollout of ``dt`` steps), which the run's log states.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nde_zoo.models.base import NeuralDE
from nde_zoo.strategies.base import GradientStrategy, Solution
from nde_zoo.strategies.config import strategy_config, strategy_from_config

__all__ = ["PDEModel", "ConvField", "fd_laplacian", "fd_first_derivative", "fd_third_derivative",
           "fd_dispersion", "fixed_step_strategy", "CORRECTIONS"]

log = logging.getLogger("nde_zoo")
_ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus, "silu": nn.SiLU}
KNOWN = ("none", "diffusion", "dispersion")
CORRECTIONS = ("add", "skew")


def fd_laplacian(u: Tensor, dim: int, dx: float) -> Tensor:
    """The periodic second-order finite-difference Laplacian of ``u`` ``(..., *grid)`` over its last
    ``dim`` axes, grid spacing ``dx``."""
    out = torch.zeros_like(u)
    for axis in range(-dim, 0):
        out = out + torch.roll(u, 1, axis) + torch.roll(u, -1, axis) - 2 * u
    return out / (dx * dx)


def fd_first_derivative(u: Tensor, dx: float) -> Tensor:
    """The periodic central difference ``(u_{i+1} - u_{i-1}) / (2 dx)`` over the last axis."""
    return (torch.roll(u, -1, -1) - torch.roll(u, 1, -1)) / (2 * dx)


def fd_third_derivative(u: Tensor, dx: float) -> Tensor:
    """The periodic second-order central difference of ``u_xxx`` over the last axis:
    ``(u_{i+2} - 2 u_{i+1} + 2 u_{i-1} - u_{i-2}) / (2 dx^3)``. Its symbol is purely imaginary
    (``-2i sin(k dx) (1 - cos(k dx)) / dx^3``, at most ``2.6 / dx^3`` in modulus): it moves energy
    between scales and neither adds nor removes any."""
    return (torch.roll(u, -2, -1) - 2 * torch.roll(u, -1, -1) + 2 * torch.roll(u, 1, -1)
            - torch.roll(u, 2, -1)) / (2 * dx**3)


def fd_dispersion(u: Tensor, dim: int, dx: float) -> Tensor:
    """The periodic finite difference of ``u_xxx`` (``dim=1``, :func:`fd_third_derivative`) or of
    ``(u_xx + u_yy)_x`` (``dim=2``, Zakharov-Kuznetsov's, ``x`` the last axis, ``y`` the one before):
    the central difference in ``x`` of the finite-difference Laplacian (in 1-D that is exactly
    :func:`fd_third_derivative`'s stencil). The two operators commute and the central one is skew, so
    the symbol stays purely imaginary: the operator moves energy between scales and neither adds nor
    removes any."""
    if dim == 1:
        return fd_third_derivative(u, dx)
    return fd_first_derivative(fd_laplacian(u, dim, dx), dx)


class ConvField(nn.Module):
    """``du/dt`` on a periodic grid: a convolutional net (circular padding), plus ``D lap_h u`` when
    ``known="diffusion"``.

    Args:
        dim: 1 or 2 spatial dimensions. channels: the field's channels.
        width / depth: hidden channels and hidden layers (each a ``kernel_size`` convolution).
        kernel_size: odd; the stencil's width in grid points.
        activation: ``tanh``, ``gelu``, ``softplus`` or ``silu``.
        known: ``none`` (the net is the whole right-hand side), ``diffusion`` or ``dispersion``
            (:func:`fd_dispersion`).
        diffusion: the known coefficient of each channel (``known="diffusion"``).
        dispersion: the known coefficient ``c`` of ``-c u_xxx`` (``-c (u_xx + u_yy)_x`` in 2-D).
        correction: ``add`` (``du/dt = known + net(u)``) or ``skew`` (one channel: ``du/dt = known +
            D1(a u) + a D1 u`` with ``a = net(u)`` and ``D1`` the central difference in ``x``, a skew-symmetric
            operator on ``u`` for any ``a``: the learned part neither adds nor removes energy
            ``sum u^2``; Burgers', KdV's and ZK's ``-u u_x`` is ``a = -u / 3``).
        dx: grid spacing.

    Shapes: ``u`` ``(batch, channels, *grid)`` -> same; ``t`` is unused (autonomous).
    """

    def __init__(self, dim: int, channels: int, width: int = 32, depth: int = 2, kernel_size: int = 5,
                 activation: str = "tanh", known: str = "diffusion", diffusion: Sequence[float] | None = None,
                 dx: float = 1.0, dispersion: float = 0.0, correction: str = "add") -> None:
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"dim must be 1 or 2, got {dim}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (a centred stencil), got {kernel_size}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        if known not in KNOWN:
            raise ValueError(f"known must be one of {', '.join(KNOWN)}, got {known!r}")
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
        if correction == "skew" and channels != 1:
            raise ValueError(f"correction='skew' is for one channel, got channels={channels}")
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        layers: list[nn.Module] = []
        c_in = channels
        for _ in range(max(1, depth)):
            layers += [conv(c_in, width, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
                       _ACTIVATIONS[activation]()]
            c_in = width
        last = conv(width, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
        if known != "none":  # a correction: the untrained model is the known physics
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.dim, self.channels, self.known, self.dx = dim, channels, known, float(dx)
        self.dispersion, self.correction = float(dispersion), correction
        coefficients = [0.0] * channels if diffusion is None else [float(d) for d in diffusion]
        if len(coefficients) != channels:
            raise ValueError(f"diffusion must hold {channels} coefficient(s), got {list(coefficients)}")
        self.register_buffer("diffusion", torch.tensor(coefficients).reshape(channels, *([1] * dim)),
                             persistent=False)

    def forward(self, t: Tensor, u: Tensor) -> Tensor:
        out = self.net(u)
        if self.correction == "skew":  # a = net(u) enters as D1(a u) + a D1 u: skew in u, energy kept
            out = fd_first_derivative(out * u, self.dx) + out * fd_first_derivative(u, self.dx)
        if self.known == "diffusion":
            out = out + self.diffusion.to(u.dtype) * fd_laplacian(u, self.dim, self.dx)
        elif self.known == "dispersion":
            out = out - self.dispersion * fd_dispersion(u, self.dim, self.dx)
        return out


def fixed_step_strategy(strategy: GradientStrategy, solver: str, dt: float) -> GradientStrategy:
    """``strategy`` itself when it steps with fixed steps, else the same strategy rebuilt with
    ``solver`` and ``step_size=dt`` (a wrapper's inner strategy likewise)."""
    config = strategy_config(strategy)
    changed = _fixed(config, solver, dt)
    return strategy if changed is None else strategy_from_config(changed)


def _fixed(config: Mapping[str, Any], solver: str, dt: float) -> dict[str, Any] | None:
    """The config with fixed stepping, or None when it needs no change."""
    config = dict(config)
    inner = config.get("inner")
    if isinstance(inner, Mapping):  # a wrapper (ernode): its inner strategy solves
        changed = _fixed(inner, solver, dt)
        if changed is None:
            return None
        config["inner"] = changed
        return config
    if "step_size" not in config or config.get("steps") is not None or config.get("step_size") is not None:
        return None
    config.update(solver=solver, step_size=float(dt), rtol=None, atol=None)
    return config


class PDEModel(NeuralDE):
    """A neural PDE on a periodic grid, trained through rollouts (see the module docstring).

    Args:
        strategy: the gradient strategy of the rollout.
        dim / channels / points / length: the grid (from the data config: ``configs/data/burgers.yaml``).
        diffusion: the known diffusion coefficient of each channel (``known="diffusion"``).
        dispersion: the known dispersion coefficient ``c`` of ``-c u_xxx`` (``-c (u_xx + u_yy)_x`` in 2-D;
            ``known="dispersion"``).
        known: ``diffusion`` (learn a correction to ``D lap_h u``), ``dispersion`` (to ``-c disp_h u``,
            :func:`fd_dispersion`) or ``none`` (learn the whole RHS).
        correction: ``add`` (``known + net(u)``) or ``skew`` (``known + D1(a u) + a D1 u``, ``a = net(u)``:
            energy-conserving, one channel; :class:`ConvField`).
        width / depth / kernel_size / activation: the convolutional net (:class:`ConvField`).
        dt / solver: the rollout's step and method when the strategy is adaptive.
        field: your own field ``f(t, u)`` on ``(batch, channels, *grid)`` (an ``nn.Module`` or a config
            with ``_target_``); None builds :class:`ConvField`.
        lr / weight_decay / lr_final_factor: AdamW and its cosine decay.
    """

    config_name = "pde"

    def __init__(
        self,
        strategy: GradientStrategy,
        dim: int = 1,
        channels: int = 1,
        points: int = 64,
        length: float = 2 * math.pi,
        diffusion: Sequence[float] | None = None,
        dispersion: float = 0.0,
        known: str = "diffusion",
        correction: str = "add",
        width: int = 16,
        depth: int = 2,
        kernel_size: int = 5,
        activation: str = "tanh",
        dt: float = 0.05,
        solver: str = "midpoint",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        lr_final_factor: float = 0.1,
        field: nn.Module | dict | None = None,
    ) -> None:
        if isinstance(strategy, Mapping):
            strategy = strategy_from_config(strategy)
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        fixed = fixed_step_strategy(strategy, solver, dt) if isinstance(strategy, GradientStrategy) else strategy
        if fixed is not strategy:
            log.info("model=pde: the adaptive strategy %s rolls out with fixed steps: solver=%s, step_size=%g "
                     "(give strategy.steps= or strategy.step_size= to choose them)",
                     getattr(strategy, "name", type(strategy).__name__), solver, dt)
        super().__init__(fixed, lr=lr, weight_decay=weight_decay, lr_final_factor=lr_final_factor)
        self.dim, self.channels, self.points, self.length = int(dim), int(channels), int(points), float(length)
        self.dx = self.length / self.points
        self.field = self.build_field(field, lambda: ConvField(
            self.dim, self.channels, width, depth, kernel_size, activation, known, diffusion, self.dx, dispersion,
            correction))

    # -- hooks a downstream project may override ---------------------------------------------
    def vector_field(self) -> nn.Module:
        return self.field

    def rollout(self, u0: Tensor, ts: Tensor) -> tuple[Tensor, Solution]:
        """Fields ``(batch, len(ts), channels, *grid)`` at ``ts`` (1-D, from ``ts[0]``) from ``u0``."""
        expected = (self.channels, *([self.points] * self.dim))
        if tuple(u0.shape[1:]) != expected:
            raise ValueError(f"model=pde expects fields of shape (batch, {', '.join(map(str, expected))}) "
                             f"(channels, *grid), got {tuple(u0.shape)}; set model.dim/channels/points to the data's")
        solution = self.solve(self.vector_field(), u0, ts.to(u0))
        return solution.ys.transpose(0, 1), solution

    def forward(self, u0: Tensor, ts: Tensor) -> Tensor:
        return self.rollout(u0, ts)[0]

    @staticmethod
    def relative_error(predicted: Tensor, target: Tensor) -> Tensor:
        """Relative L2 error per example and time: ``(batch, T)``."""
        dims = tuple(range(2, predicted.dim()))
        return (predicted - target).pow(2).sum(dims).sqrt() / target.pow(2).sum(dims).sqrt().clamp_min(1e-12)

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        t, u = batch
        ts = t[0] - t[0, 0]
        predicted, solution = self.rollout(u[:, 0], ts)
        loss = (predicted[:, 1:] - u[:, 1:]).pow(2).mean()
        n = len(u)
        if stage == "train":
            loss = loss + self.strategy.regularisation(solution)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n)
        if stage != "train":
            rel = self.relative_error(predicted[:, 1:].detach(), u[:, 1:])
            self.log(f"{stage}/rel_error", rel.mean(), prog_bar=True, batch_size=n)
            self.log(f"{stage}/final_rel_error", rel[:, -1].mean(), batch_size=n)
        self.log(f"{stage}/nfe", float(solution.stats.nfe_forward), on_step=False, on_epoch=True, batch_size=n)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        t, u = batch
        return self(u[:, 0], t[0] - t[0, 0])

    # -- pictures at the end of fit -----------------------------------------------------------
    def on_fit_end(self) -> None:
        super().on_fit_end()
        out = self.output_dir()
        datamodule = getattr(self.trainer, "datamodule", None)
        if out is None or self.trainer.global_rank != 0 or datamodule is None:
            return
        from nde_zoo.pictures import pyplot

        plt = pyplot()
        if plt is None:  # the [plots] extra is optional
            return
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in self.pictures(datamodule, plt).items():
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)

    @torch.no_grad()
    def test_rollouts(self, datamodule: Any, split: str = "test") -> tuple[Tensor, Tensor, Tensor]:
        """``(times, truth, predicted)`` of every trajectory of ``split``, rolled out from its start."""
        datamodule.setup("test")
        dataset = datamodule.dataset(split)
        t, u = (torch.stack(x) for x in zip(*(dataset[i] for i in range(len(dataset))), strict=True))
        was_training = self.training
        self.eval()
        u = u.to(self.device, self.dtype)
        ts = (t[0] - t[0, 0]).to(self.device)
        predicted = torch.cat([self(u[i: i + 16, 0], ts) for i in range(0, len(u), 16)])
        self.train(was_training)
        return ts.cpu(), u.cpu(), predicted.cpu()

    def pictures(self, datamodule: Any, plt: Any, split: str = "test") -> dict[str, Any]:
        """``pde_rollout``: true and learned fields of one trajectory at several times; ``pde_error``:
        the relative L2 error over the horizon (mean and range over the split's trajectories)."""
        from nde_zoo.pictures import run_title

        ts, truth, predicted = self.test_rollouts(datamodule, split)
        window = getattr(datamodule, "train_window", None)
        obs_dt = float(ts[1] - ts[0]) if len(ts) > 1 else 1.0
        picks = sorted({round(f * (len(ts) - 1)) for f in (0.0, 0.25, 0.5, 1.0)})
        figures = {}
        if self.dim == 1:
            fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3), sharey=True, squeeze=False)
            x = torch.arange(self.points) * self.dx
            for ax, k in zip(axes[0], picks, strict=True):
                for c in range(self.channels):
                    ax.plot(x, truth[0, k, c], color="k", lw=1.2, label="true" if c == 0 else None)
                    ax.plot(x, predicted[0, k, c], "--", color="tab:orange", lw=1.2,
                            label="learned" if c == 0 else None)
                ax.set_title(f"t = {float(ts[k]):g}", fontsize=8)
                ax.set_xlabel("x")
            axes[0, 0].legend(fontsize=7)
        else:
            fig, axes = plt.subplots(2, len(picks), figsize=(2.6 * len(picks), 5.2), squeeze=False)
            lo, hi = float(truth[0, :, 0].min()), float(truth[0, :, 0].max())
            for j, k in enumerate(picks):
                for i, (what, field) in enumerate((("true", truth), ("learned", predicted))):
                    axes[i, j].imshow(field[0, k, 0], vmin=lo, vmax=hi, cmap="viridis")
                    axes[i, j].set_title(f"{what}, t = {float(ts[k]):g}", fontsize=8)
                    axes[i, j].axis("off")
        fig.suptitle(run_title(self, f"{split} trajectory 0, channel 0"), fontsize=8)
        fig.tight_layout()
        figures["pde_rollout"] = fig

        rel = self.relative_error(predicted[:, 1:], truth[:, 1:])  # (n, T)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(ts[1:], rel.mean(0), color="tab:blue", label=f"mean over {len(rel)} {split} trajectories")
        ax.fill_between(ts[1:], rel.min(0).values, rel.max(0).values, color="tab:blue", alpha=0.2, label="range")
        if window:
            ax.axvline(window * obs_dt, color="0.4", lw=0.8, ls=":", label="training window")
        ax.set_xlabel("t")
        ax.set_ylabel("relative L2 error")
        ax.legend(fontsize=7)
        ax.set_title(run_title(self, "error over the rollout horizon"), fontsize=7)
        fig.tight_layout()
        figures["pde_error"] = fig
        return figures
