"""Continuous normalising flows (FFJORD; Grathwohl et al., ICLR 2019).

The state ``(z, delta)`` is packed in one tensor ``(batch, dim + 1)`` and solved from the
data at ``t = 0`` to the base at ``t = t1``:

    dz/dt = f(t, z),   d delta/dt = -tr(df/dz),   log p(x) = log N(z(t1); 0, I) - delta(t1).

The trace is exact up to ``exact_trace_max_dim`` dimensions, Hutchinson's estimator
``e^T (df/dz) e`` above it (Rademacher or Gaussian ``e``, drawn once per solve). The
built-in velocities carry their Jacobian-vector products (``forward_and_jvp``: forward-mode
differentiation written layer by layer, as OT-Flow (Onken et al., AAAI 2021) takes its
exact trace), so the field is an ordinary forward computation; a velocity without it is
differentiated by ``torch.autograd.grad`` inside the field, under ``torch.enable_grad()``.
Either way the field takes the derivatives itself, so every strategy works with it,
including those that re-evaluate the field on detached leaves in their own backward pass
(reversible, symplectic, checkpoint).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from nde_zoo.models.base import NeuralDE
from nde_zoo.strategies.base import GradientStrategy, Solution

log = logging.getLogger("nde_zoo")

__all__ = ["CNF", "CNFField", "MLPVelocity", "ConcatSquashLinear", "ConcatSquashVelocity", "ARCHITECTURES"]

ARCHITECTURES = ("concatsquash", "concat")
DENSITY_RANGE = 6.0  # nats of log-density shown below the peak in the picture
ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def activation_and_jvp(activation: nn.Module, a: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``h = activation(a)`` ``(batch, n)`` and its Jacobian on tangents ``v`` ``(batch or 1, k, n)``.

    The derivative takes the same branches as torch's own backward (ELU's ``alpha exp(a)`` below zero,
    Softplus linear above its threshold), so the trace equals autograd's to round-off. The clamp keeps
    the branch not taken finite (an ``inf`` there would make ``torch.where``'s gradient NaN).
    """
    h = activation(a)
    if v is None:
        return h, None
    if isinstance(activation, nn.ELU) and activation.alpha == 1.0:
        # from the output, in two operations: 1 above zero, exp(a) = h + 1 at or below (h = expm1(a))
        slope = h.clamp(max=0) + 1
    elif isinstance(activation, nn.ELU):
        slope = torch.where(a > 0, torch.ones_like(a), activation.alpha * a.clamp(max=0).exp())
    elif isinstance(activation, nn.Softplus):
        scaled = a * activation.beta
        slope = torch.where(scaled > activation.threshold, torch.ones_like(a), torch.sigmoid(scaled))
    elif isinstance(activation, nn.Tanh):
        slope = 1 - h * h
    else:
        raise TypeError(f"no derivative by hand for {type(activation).__name__}")
    return h, v * slope.unsqueeze(-2)


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-conditioned layer: ``(W x + b) * gate(a t + c) + d t``.

    Shapes: ``t`` 0-d, ``x`` ``(batch, dim_in)`` -> ``(batch, dim_out)``. Time gates and shifts every
    unit, so a small network can make the flow's speed and direction change along the way.
    ``gate(u) = (1 + u / (1 + |u|)) / 2``, a sigmoid shape built from operations that save their
    inputs: operations that save their *output* for backward (``torch.sigmoid``, ``tanh``) leak memory
    at every step when a field that takes its own derivatives (the CNF's trace) is replayed by the
    reversible or symplectic backward (measured: about 7 MB per training step with tanh).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.forward_and_jvp(t, x, None)[0]

    def forward_and_jvp(self, t: Tensor, x: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The layer and its Jacobian applied to tangents ``v`` ``(batch or 1, k, dim_in)`` -> ``(.., k, dim_out)``.

        The Jacobian of ``x -> (W x + b) * gate`` is ``diag(gate) W``: no autograd needed (``v`` None: no tangents).
        """
        tt = t.to(x).reshape(1, 1)
        u = self.gate(tt)
        gate = 0.5 + 0.5 * u / (1 + u.abs())  # (1, dim_out)
        out = self.linear(x) * gate + self.shift(tt)
        # F.linear, not `v @ weight.T`: a compiled loop refuses `.T` of a parameter (an aliasing input)
        return out, None if v is None else nn.functional.linear(v, self.linear.weight) * gate


class ConcatSquashVelocity(nn.Module):
    """``f(t, z)``: ``depth`` hidden :class:`ConcatSquashLinear` layers of ``width`` units (FFJORD's toy).

    Shapes: ``t`` 0-d, ``z`` ``(batch, dim)`` -> ``(batch, dim)``.
    """

    def __init__(self, dim: int, width: int = 64, depth: int = 2, activation: str = "elu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        sizes = [dim] + [width] * depth + [dim]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in pairs)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = self.activation(z)
        return z

    def forward_and_jvp(self, t: Tensor, z: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``f(t, z)`` and ``(df/dz) v`` for tangents ``v`` ``(batch or 1, k, dim)`` -> ``(batch, k, dim)``.

        Forward-mode differentiation by hand, layer by layer (see :class:`CNFField`).
        """
        for i, layer in enumerate(self.layers):
            z, v = layer.forward_and_jvp(t, z, v)
            if i < len(self.layers) - 1:
                z, v = activation_and_jvp(self.activation, z, v)
        return z, v


class MLPVelocity(nn.Module):
    """``f(t, z)``: an MLP on ``[z, t]`` with softplus activations.

    Shapes: ``t`` 0-d, ``z`` ``(batch, dim)`` -> ``(batch, dim)``.
    """

    def __init__(self, dim: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [dim + 1] + [width] * depth
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.Softplus()]
        layers.append(nn.Linear(sizes[-1], dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(torch.cat([z, t.to(z).expand(z.shape[0], 1)], dim=-1))

    def forward_and_jvp(self, t: Tensor, z: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``f(t, z)`` and ``(df/dz) v`` for tangents ``v`` ``(batch or 1, k, dim)`` -> ``(batch, k, dim)``."""
        x = torch.cat([z, t.to(z).expand(z.shape[0], 1)], dim=-1)
        first, *rest = self.net
        x = first(x)
        if v is not None:  # time is an input with no tangent: only the weight's z columns act
            v = nn.functional.linear(v, first.weight[:, : z.shape[1]])
        for module in rest:
            if isinstance(module, nn.Linear):
                x = module(x)
                v = None if v is None else nn.functional.linear(v, module.weight)
            else:
                x, v = activation_and_jvp(module, x, v)
        return x, v


_JVP_LEAVES = (nn.Linear, nn.ELU, nn.Softplus, nn.Tanh)


def _defined_in(cls: type, name: str) -> type:
    return next(k for k in cls.__mro__ if name in k.__dict__)


def _jvp_matches_forward(velocity: nn.Module) -> bool:
    """True when ``forward_and_jvp`` can be trusted to differentiate ``forward`` (see
    :meth:`CNFField.takes_trace_by_hand`): a subclass that overrides ``forward`` alone would
    otherwise be differentiated as its parent, a silently wrong trace."""
    for module in velocity.modules():
        kind = type(module)
        if hasattr(module, "forward_and_jvp"):
            if not issubclass(_defined_in(kind, "forward_and_jvp"), _defined_in(kind, "forward")):
                return False
        elif not any(True for _ in module.children()) and kind not in _JVP_LEAVES:
            return False
    return True


class CNFField(nn.Module):
    """``[f(t, z), -tr(df/dz)]`` for a velocity field ``f`` (by default :class:`MLPVelocity`).

    Shapes: ``state`` is ``(batch, dim + 1)``; returns the same shape. ``velocity``: any module
    ``f(t, z) -> dz/dt`` on ``(batch, dim)``; None builds ``MLPVelocity(dim, width, depth)``.
    """

    def __init__(self, dim: int, width: int = 64, depth: int = 2, exact_trace_max_dim: int = 8,
                 noise: str = "rademacher", velocity: nn.Module | None = None) -> None:
        super().__init__()
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        self.net = velocity if velocity is not None else MLPVelocity(dim, width, depth)
        self.dim = dim
        self.exact = dim <= exact_trace_max_dim
        self.noise_kind = noise
        self.probe: Tensor | None = None  # Hutchinson noise, fixed within a solve

    def draw_probe(self, like: Tensor, generator: torch.Generator | None = None) -> None:
        """Draw Hutchinson's noise ``(batch, dim)`` for the next solve (a no-op for exact traces)."""
        if self.exact:
            self.probe = None
            return
        shape = (like.shape[0], self.dim)
        e = torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
        self.probe = e.sign() if self.noise_kind == "rademacher" else e

    def velocity(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(t, z)

    def takes_trace_by_hand(self) -> bool:
        """Whether the velocity gives its own Jacobian-vector products (``forward_and_jvp``), as the
        built-in ones do. Autograd takes the trace instead wherever the products could disagree with
        the function: a subclass overriding :meth:`velocity`, a module whose ``forward`` is overridden
        below its ``forward_and_jvp``, or a layer the products do not know (other than ``nn.Linear``,
        ``nn.ELU``, ``nn.Softplus``, ``nn.Tanh``, exactly those types)."""
        return (hasattr(self.net, "forward_and_jvp") and type(self).velocity is CNFField.velocity
                and _jvp_matches_forward(self.net))

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        if self.takes_trace_by_hand():
            return self._forward_by_hand(t, state)
        if torch.compiler.is_compiling():  # inside a compiled solve: the same trace by torch.func
            return self._forward_functional(t, state)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "the CNF takes its trace with autograd, which inference mode forbids: evaluate it under "
                "torch.no_grad() instead, e.g. lightning.Trainer(inference_mode=False) "
                "(trainer.inference_mode=false; configs/model/cnf.yaml sets it)"
            )
        with torch.enable_grad():
            z = state[:, : self.dim]
            if not z.requires_grad:  # a no-graph forward: differentiate w.r.t. a fresh leaf
                z = z.detach().requires_grad_(True)
            f = self.velocity(t, z)
            if self.exact:
                trace = sum(
                    torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(self.dim)
                )
            else:
                if self.probe is None or self.probe.shape[0] != z.shape[0]:
                    raise RuntimeError("Hutchinson's estimator needs CNFField.draw_probe(...) before the solve")
                vjp = torch.autograd.grad(f, z, self.probe, create_graph=True)[0]
                trace = (vjp * self.probe).sum(dim=1)
        return torch.cat([f, -trace[:, None]], dim=1)

    def _forward_by_hand(self, t: Tensor, state: Tensor) -> Tensor:
        """The trace by forward-mode differentiation written into the velocity (``forward_and_jvp``).

        Exact: the tangents are the ``dim`` unit vectors, ``tr(J) = sum_i (J e_i)_i``; Hutchinson:
        the one tangent ``e``, ``e^T J e``. The field is then an ordinary forward computation: no
        ``torch.autograd.grad`` inside it, so a strategy differentiates it once (not through a
        graph of graphs), it runs under inference mode, and a compiled solve traces plain matrix
        products (docs/compile.md). The cost is ``dim`` extra products per layer for the exact
        trace, one for Hutchinson's.
        """
        z = state[:, : self.dim]
        if self.exact:
            tangents = torch.eye(self.dim, dtype=z.dtype, device=z.device).unsqueeze(0)  # (1, dim, dim)
        else:
            if self.probe is None or self.probe.shape[0] != z.shape[0]:
                raise RuntimeError("Hutchinson's estimator needs CNFField.draw_probe(...) before the solve")
            tangents = self.probe.unsqueeze(1)  # (batch, 1, dim)
        f, jv = self.net.forward_and_jvp(t, z, tangents)
        if self.exact:
            trace = jv.diagonal(dim1=1, dim2=2).sum(dim=1)
        else:
            trace = (jv.squeeze(1) * self.probe).sum(dim=1)
        return torch.cat([f, -trace[:, None]], dim=1)

    def _forward_functional(self, t: Tensor, state: Tensor) -> Tensor:
        """:meth:`forward` with ``torch.func`` transforms instead of ``torch.autograd.grad``.

        A compiled solve (``strategy.compile=true``) traces the field into one program, where
        ``torch.autograd.grad`` would be a graph break; ``vmap(jacrev(...))`` (exact) and
        ``torch.func.vjp`` (Hutchinson) give the same trace and stay differentiable. Eagerly they
        are slower than autograd rows, so only compiled solves use them.
        """
        z = state[:, : self.dim]
        f = self.velocity(t, z)
        if self.exact:
            def one(z_row: Tensor) -> Tensor:
                return self.velocity(t, z_row.unsqueeze(0)).squeeze(0)

            trace = torch.func.vmap(torch.func.jacrev(one))(z).diagonal(dim1=1, dim2=2).sum(dim=1)
        else:
            if self.probe is None or self.probe.shape[0] != z.shape[0]:
                raise RuntimeError("Hutchinson's estimator needs CNFField.draw_probe(...) before the solve")
            _, pullback = torch.func.vjp(lambda z: self.velocity(t, z), z)
            trace = (pullback(self.probe)[0] * self.probe).sum(dim=1)
        return torch.cat([f, -trace[:, None]], dim=1)


def gaussian_mixture_nll(train: Tensor, test: Tensor, components: int = 20, seed: int = 0,
                         max_rows: int = 20_000) -> float:
    """Mean NLL (nats) on ``test`` ``(n, dim)`` of a full-covariance Gaussian mixture fitted to ``train``.

    The yardstick of a flow on the same split: on two moons 20 components take seconds.
    """
    from sklearn.mixture import GaussianMixture

    x = train[:max_rows].double().cpu().numpy()
    mixture = GaussianMixture(n_components=min(components, len(x)), covariance_type="full", reg_covar=1e-6,
                              random_state=seed).fit(x)
    return float(-mixture.score(test.double().cpu().numpy()))


class CNF(NeuralDE):
    """FFJORD density model with a standard normal base; NLL in nats, logged as ``{stage}/nll``.

    Args:
        strategy: the gradient strategy of the flow's solve.
        dim: data dimension.
        width / depth: the MLP field's hidden width and number of hidden layers.
        t1: the flow runs on ``[0, t1]``.
        exact_trace_max_dim: exact trace up to this dimension, Hutchinson's estimator above.
        noise: ``"rademacher"`` or ``"gaussian"`` Hutchinson noise.
        lr / weight_decay / lr_final_factor: AdamW, and its cosine decay (see :class:`NeuralDE`).
        field: the velocity ``f(t, z) -> dz/dt`` on ``(batch, dim)`` (the trace is taken for it), or a
            whole :class:`CNFField`; an ``nn.Module`` or a config with ``_target_``. None builds the
            default of ``architecture``.
        architecture: the default velocity: ``"concatsquash"`` (FFJORD's time-gated layers,
            :class:`ConcatSquashVelocity`) or ``"concat"`` (time as an input, :class:`MLPVelocity`).
        activation: of the concat-squash field: ``elu`` (default), ``softplus`` or ``tanh`` (tanh saves
            its output for backward, which leaks memory under reversible/symplectic; see
            :class:`ConcatSquashLinear`).
        baseline_components: test also logs ``test/gmm_nll``, the NLL of a Gaussian mixture with
            this many components fitted to the training split (0: off), so the flow's NLL has a
            yardstick on the same split.
    """

    config_name = "cnf"

    def __init__(self, strategy: GradientStrategy, dim: int = 2, width: int = 64, depth: int = 2,
                 t1: float = 1.0, exact_trace_max_dim: int = 8, noise: str = "rademacher",
                 lr: float = 1e-2, weight_decay: float = 0.0, lr_final_factor: float = 1.0,
                 field: nn.Module | dict | None = None, architecture: str = "concatsquash",
                 activation: str = "elu", baseline_components: int = 20) -> None:
        super().__init__(strategy, lr=lr, weight_decay=weight_decay, lr_final_factor=lr_final_factor)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
        self.dim = dim
        self.baseline_components = int(baseline_components)
        self._baseline_nll: float | None = None

        def default() -> nn.Module:
            if architecture == "concatsquash":
                return ConcatSquashVelocity(dim, width, depth, activation)
            return MLPVelocity(dim, width, depth)

        velocity = self.build_field(field, default)
        self.field = velocity if isinstance(velocity, CNFField) else CNFField(
            dim, width, depth, exact_trace_max_dim, noise, velocity=velocity)
        self.register_buffer("ts", torch.tensor([0.0, t1]), persistent=False)

    def vector_field(self) -> CNFField:
        """The augmented field (override to change the dynamics)."""
        return self.field

    def log_prob(self, x: Tensor) -> tuple[Tensor, Solution]:
        """``log p(x)`` per point ``(batch,)`` and the solve's :class:`Solution`."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"CNF expects points of shape (batch, {self.dim}), got {tuple(x.shape)}")
        field = self.vector_field()
        field.draw_probe(x)
        y0 = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)  # (batch, dim + 1)
        solution = self.solve(field, y0, self.ts.to(x))
        z, delta = solution.ys[-1][:, : self.dim], solution.ys[-1][:, self.dim]
        log_base = -0.5 * (z.pow(2).sum(dim=1) + self.dim * math.log(2 * math.pi))
        return log_base - delta, solution

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points ``(n, dim)``: base samples flowed from ``t1`` back to 0."""
        field = self.vector_field()
        z = torch.randn(n, self.dim, generator=generator, dtype=self.ts.dtype, device=self.ts.device)
        field.draw_probe(z)
        state = torch.cat([z, z.new_zeros(n, 1)], dim=1)
        return self.solve(field, state, self.ts.flip(0)).ys[-1][:, : self.dim]

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)[0]

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        log_p, solution = self.log_prob(x)
        nll = -log_p.mean()
        loss = nll + self.strategy.regularisation(solution) if stage == "train" else nll
        self.log(f"{stage}/nll", nll, prog_bar=True, batch_size=len(x))
        self.log(f"{stage}/loss", loss, batch_size=len(x))
        self.log(f"{stage}/nfe", float(solution.stats.nfe_forward), on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def on_test_epoch_end(self) -> None:
        """Log ``test/gmm_nll``: a Gaussian mixture's NLL on the same split, the flow's yardstick."""
        if self.baseline_components <= 0 or self._trainer is None:
            return
        if self._baseline_nll is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            try:
                train, test = (datamodule.get_split(s).tensors[0] for s in ("train", "test"))
            except (AttributeError, IndexError, TypeError, ValueError):
                return  # a datamodule without in-memory splits: no baseline
            self._baseline_nll = gaussian_mixture_nll(train, test, self.baseline_components)
            log.info("baseline: a %d-component Gaussian mixture fitted to the training split has test NLL "
                     "%.3f nats (test/gmm_nll); the flow's is test/nll", self.baseline_components,
                     self._baseline_nll)
        self.log("test/gmm_nll", self._baseline_nll, sync_dist=False)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        out = self.output_dir()
        datamodule = getattr(self.trainer, "datamodule", None)
        if out is None or self.dim != 2 or self.trainer.global_rank != 0 or datamodule is None:
            return
        from nde_zoo.pictures import pyplot

        plt = pyplot()
        if plt is None:
            return
        fig = self.samples_figure(datamodule, plt)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "cnf_samples.png", dpi=110)
        plt.close(fig)

    @torch.no_grad()
    def samples_figure(self, datamodule: Any, plt: Any, n: int = 2000) -> Any:
        """Data (test split), samples and the learned log-density, on equal axes (2-D flows)."""
        from nde_zoo.pictures import run_title

        data = datamodule.test_dataloader().dataset.tensors[0][:n]
        samples = self.sample(n, torch.Generator(device=self.ts.device).manual_seed(0)).cpu()
        lo, hi = data.min(0).values - 0.5, data.max(0).values + 0.5
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 120), torch.linspace(lo[1], hi[1], 120), indexing="xy")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).to(self.ts)
        log_density = torch.cat([self(chunk) for chunk in grid.split(4096)]).reshape(gx.shape).cpu()
        # log scale, clipped DENSITY_RANGE nats below the peak: one sharp spike cannot wash out the rest
        log_density = log_density.clamp(min=float(log_density.max()) - DENSITY_RANGE)
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        axes[0].scatter(data[:, 0], data[:, 1], s=2)
        axes[0].set_title("data (test split)")
        axes[1].scatter(samples[:, 0], samples[:, 1], s=2, color="tab:orange")
        axes[1].set_title("samples")
        mesh = axes[2].pcolormesh(gx.numpy(), gy.numpy(), log_density.numpy(), shading="auto", cmap="viridis")
        fig.colorbar(mesh, ax=axes[2], fraction=0.046, pad=0.04, label="log p(x) (nats)")
        axes[2].set_title(f"learned log-density (clipped {DENSITY_RANGE:g} nats below its peak)", fontsize=9)
        for ax in axes:
            ax.set_xlim(float(lo[0]), float(hi[0]))
            ax.set_ylim(float(lo[1]), float(hi[1]))
            ax.set_aspect("equal")
            ax.set_xlabel("x1")
            ax.set_ylabel("x2")
        fig.suptitle(run_title(self), fontsize=8)
        fig.tight_layout()
        return fig
