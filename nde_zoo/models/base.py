"""The LightningModule every model family builds on.

A :class:`NeuralDE` owns its :class:`~nde_zoo.strategies.GradientStrategy` and returns it
from ``configure_callbacks()``, so the Trainer registers it once and it logs its own
figures. Subclasses provide the physics (``vector_field``) and ``_common_step``; a
downstream project overrides one hook and inherits the rest.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import math
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning
import torch
from lightning.pytorch.utilities.parsing import collect_init_args
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from nde_zoo.strategies.base import GradientStrategy, Solution
from nde_zoo.strategies.config import strategy_config, strategy_from_config

__all__ = ["NeuralDE", "strategies_supporting", "check_strategy_supports"]


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def strategies_supporting(kind: str) -> list[str]:
    """Config names of the strategy classes that declare ``kind`` ("ode" or "sde") and that
    ``strategy=<name>`` selects (a config in ``configs/strategy/``): a subclass defined elsewhere (a
    test's, a notebook's) is not offered by a name the command line does not know."""
    import nde_zoo.strategies  # noqa: F401  (registers every strategy class)
    from nde_zoo.configs_path import config_dir

    try:
        selectable = {path.stem for path in (config_dir() / "strategy").glob("*.yaml")}
    except FileNotFoundError:
        selectable = None
    names = {c.name for c in _all_subclasses(GradientStrategy)
             if c.name and kind in c.kinds and (selectable is None or c.name in selectable)}
    return sorted(names)


def check_strategy_supports(model: str, kind: str, strategy: GradientStrategy) -> None:
    """Refuse an unsupported model x strategy pair, naming the strategies that work."""
    if not isinstance(strategy, GradientStrategy):
        raise TypeError(
            f"model {model!r} needs a GradientStrategy (e.g. nde_zoo.strategies.Direct()), got "
            f"{type(strategy).__name__}"
        )
    if kind not in strategy.kinds:
        raise ValueError(
            f"gradient strategy {strategy.name or type(strategy).__name__!r} does not support "
            f"{kind.upper()}s, which model {model!r} solves; strategies that do: "
            f"{', '.join(strategies_supporting(kind))} (choose one with strategy=<name>; this is our "
            f"gradient strategy, not Lightning's trainer.strategy)"
        )


@contextlib.contextmanager
def float32_solve(y0: Tensor, ts: Tensor) -> Any:
    """Under autocast: yield ``y0``/``ts`` in float32 (when lower) with autocast off; else as they are."""
    device = y0.device.type
    if not (device in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device)):
        yield y0, ts
        return
    if y0.is_floating_point() and torch.finfo(y0.dtype).bits < 32:
        y0 = y0.float()
    if ts.is_floating_point() and torch.finfo(ts.dtype).bits < 32:
        ts = ts.float()
    with torch.autocast(device, enabled=False):
        yield y0, ts


class NeuralDE(lightning.LightningModule, abc.ABC):
    """Base of every model: owns the gradient strategy, the optimiser and the common step.

    Args:
        strategy: how gradients through the solve are computed.
        lr / weight_decay: AdamW settings.
        lr_final_factor: the learning rate follows a cosine over all training steps from ``lr``
            down to ``lr * lr_final_factor`` (1: constant).
    """

    #: what the model solves: "ode" or "sde" (checked against ``strategy.kinds``).
    kind: ClassVar[str] = "ode"
    #: config name of the model, for messages.
    config_name: ClassVar[str] = ""
    #: raise on a NaN/inf gradient before the optimiser step (see ``on_before_optimizer_step``);
    #: a subclass that handles them itself sets this to False.
    check_finite_gradients: ClassVar[bool] = True

    def __init__(self, strategy: GradientStrategy | Mapping[str, Any], lr: float = 1e-3,
                 weight_decay: float = 0.0, lr_final_factor: float = 1.0) -> None:
        super().__init__()
        if isinstance(strategy, (Mapping, DictConfig)):  # a config (``_target_`` + arguments)
            strategy = strategy_from_config(strategy)
        check_strategy_supports(self.config_name or type(self).__name__, self.kind, strategy)
        self._save_init_hyperparameters(inspect.currentframe().f_back, strategy)
        if not 0 < lr_final_factor <= 1:
            raise ValueError(f"lr_final_factor must be in (0, 1], got {lr_final_factor}")
        self.strategy = strategy
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_final_factor = lr_final_factor

    # -- self-describing checkpoints ----------------------------------------------------------
    def _save_init_hyperparameters(self, frame: Any, strategy: GradientStrategy) -> None:
        """Save every constructor argument of the whole class chain as hyperparameters.

        The strategy is saved as its config (``_target_`` + arguments, see
        :func:`~nde_zoo.strategies.config.strategy_config`), so ``Model.load_from_checkpoint(path)``
        rebuilds the same model with no arguments. A field given as a config (``_target_`` +
        arguments; the command line always gives one) stays that config, so the checkpoint loads with
        ``torch.load(weights_only=True)``, as Lightning's ``Trainer(ckpt_path=...)`` and the command
        line load it; a field given as a module is pickled into the checkpoint as it is, which only a
        trusting load reads (:func:`~nde_zoo.checkpoints.pickled_objects_message` says how).
        """
        hparams: dict[str, Any] = {}
        # From NeuralDE.__init__ outwards: each subclass's arguments (the most derived win).
        for local in collect_init_args(frame, [], classes=(NeuralDE,)):
            hparams.update(local)
        hparams.pop("frame", None)
        hparams["strategy"] = strategy_config(strategy)
        for key, value in list(hparams.items()):  # plain containers: the checkpoint loads with weights_only
            if OmegaConf.is_config(value):
                hparams[key] = OmegaConf.to_container(value, resolve=True)
        with warnings.catch_warnings():  # a field module is kept on purpose: loading needs no arguments
            warnings.filterwarnings("ignore", message=r".*is an instance of `nn.Module` and is already saved")
            self.save_hyperparameters(hparams, logger=True)

    @classmethod
    def _identity(cls) -> dict[str, str]:
        name = cls.config_name or cls.__name__
        return {"model": f"{cls.__module__}.{cls.__qualname__}", "config_name": name}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Name the model class, the nde_zoo version (and, under the CLI, the run's config overrides)."""
        from nde_zoo import __version__

        identity = {**self._identity(), "version": __version__}
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():  # a resume that kept its checkpoint's strategy keeps its overrides
                identity["overrides"] = [*getattr(self, "_inherited_overrides", ()),
                                         *HydraConfig.get().overrides.task]
        except (ImportError, ValueError):  # pragma: no cover
            pass
        checkpoint["nde_zoo"] = identity
        from nde_zoo.checkpoints import add_checksum

        add_checksum(checkpoint, scope="state_dict")  # the weights of every zoo checkpoint verifiable on load

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from nde_zoo.checkpoints import migrate_checkpoint

        migrate_checkpoint(checkpoint)  # an older nde_zoo's checkpoint brought up to this one; a newer warns
        self.check_checkpoint_model(checkpoint, type(self), "this checkpoint")
        if self._trainer is None:  # load_from_checkpoint: no trainer restores the callbacks, so the
            # strategy's own state (Auto's choice, the ERNODE schedule) comes back with the weights here
            state = (checkpoint.get("callbacks") or {}).get(self.strategy.state_key)
            if state:
                self.strategy.load_state_dict(state)

    @staticmethod
    def check_checkpoint_model(checkpoint: dict[str, Any], cls: type, where: str) -> None:
        """Refuse a checkpoint written by another model class, naming both."""
        saved = checkpoint.get("nde_zoo") if isinstance(checkpoint, dict) else None
        if not saved or saved.get("model") == f"{cls.__module__}.{cls.__qualname__}":
            return
        module, _, name = str(saved["model"]).rpartition(".")
        try:
            import importlib

            saved_cls = getattr(importlib.import_module(module), name)
            if issubclass(cls, saved_cls) or issubclass(saved_cls, cls):
                return  # a subclass loading its base's checkpoint (or the reverse) is the user's call
        except (ImportError, AttributeError, ValueError):
            pass
        wanted = getattr(cls, "config_name", "") or cls.__name__
        raise ValueError(
            f"{where} was written by model {saved['model']} (model={saved.get('config_name')}), but it is "
            f"being loaded into {cls.__module__}.{cls.__qualname__} (model={wanted}); load it with "
            f"{name}.load_from_checkpoint(...), or on the command line drop model= (the checkpoint's own "
            f"config is used) or pass model={saved.get('config_name')}"
        )

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = False,
                             **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, checking first that the checkpoint is this model's.

        No arguments are needed: the checkpoint holds every constructor argument, the strategy
        as a config. Keyword arguments override saved ones (``strategy=Symplectic()``).
        ``weights_only`` defaults to False because a field given as a module is pickled in the
        hyperparameters: load only checkpoints you trust. A checkpoint whose field was given as a
        config holds no pickled objects and loads with ``weights_only=True``; one that does hold
        them, loaded so, raises ``pickle.UnpicklingError`` naming them and the ways to read it.
        """
        from lightning.fabric.utilities.cloud_io import _load

        if isinstance(checkpoint_path, (str, Path)):
            try:
                checkpoint = _load(checkpoint_path, map_location="cpu", weights_only=weights_only)
            except pickle.UnpicklingError as exc:  # a field given as a module, loaded safely: name it and how
                from nde_zoo.checkpoints import pickled_objects_message

                raise pickle.UnpicklingError(pickled_objects_message(
                    checkpoint_path, f"checkpoint {checkpoint_path}", exc, model=cls.__name__)) from exc
            from nde_zoo.checkpoints import verify_checksum

            verify_checksum(checkpoint, f"checkpoint {checkpoint_path}")  # flipped bytes: CheckpointError
            from nde_zoo.checkpoints import migrate_checkpoint

            migrate_checkpoint(checkpoint, f"checkpoint {checkpoint_path}")  # warns here, naming the file
            NeuralDE.check_checkpoint_model(checkpoint, cls, f"checkpoint {checkpoint_path}")
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                            hparams_file=hparams_file, strict=strict,
                                            weights_only=weights_only, **kwargs)

    # -- the vector field --------------------------------------------------------------------
    @staticmethod
    def build_field(field: nn.Module | Mapping[str, Any] | None, default: Any,
                    what: str = "field") -> nn.Module:
        """The model's vector field: ``field`` when given, else ``default()``.

        ``field`` is an ``nn.Module`` or a config with ``_target_`` (from the command line:
        ``'model.field={_target_: my_project.MyField, width: 64}'``); the default is built only
        when none is given, so a user's field trains, checkpoints and gradchecks alone.
        Conditioning a field on context: docs/extending.md ("Your own vector field").
        """
        if field is None:
            return default()
        if isinstance(field, (Mapping, DictConfig)):
            from nde_zoo.strategies.config import instantiate_target

            field = instantiate_target(field, what)
        if not isinstance(field, nn.Module):
            raise TypeError(
                f"{what} must be an nn.Module, a config with _target_, or None (the default field), got "
                f"{type(field).__name__}; see docs/extending.md ('Your own vector field')"
            )
        return field

    # -- hooks a downstream project may override ---------------------------------------------
    @abc.abstractmethod
    def _common_step(self, batch: Any, stage: str) -> Tensor:
        """Compute and log ``{stage}/loss`` (and metrics); return the loss."""

    def solve(self, field: Any, y0: Tensor, ts: Tensor) -> Solution:
        """Solve with the owned strategy (a hook for subclasses that wrap it).

        Under mixed precision (``trainer.precision=bf16-mixed`` / ``16-mixed``, i.e. autocast) the
        solve runs in float32, state and field: a strategy with its own backward replays the field
        outside autocast, and the reversible inverse needs a float32 state. The rest of the model
        (encoders, heads) keeps the lower precision. A state made half precision explicitly,
        outside autocast, still reaches the strategy (and the reversible one refuses it).
        """
        with float32_solve(y0, ts) as (y0, ts):
            return self.strategy.solve(field, y0, ts)

    # -- Lightning ---------------------------------------------------------------------------
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, except that a figure aggregated over the epoch is synced across ranks.

        Under DDP each rank would otherwise report the mean over its own shard: ``val/loss`` (which
        selects the best checkpoint), ``val/nfe``, ``train/nfe``, ``test/loss``... would differ between
        ranks, and a checkpoint improving the global mean could be refused because one rank saw no
        improvement. Unless the call says ``sync_dist=`` itself, an epoch-level figure (Lightning's
        default in validation and test, ``on_epoch=True`` in training) that is not also logged per step
        gets ``sync_dist=True``: the batch-size-weighted mean over every rank, one all-reduce at the end
        of the epoch. Step-level figures and torchmetrics objects (which sync themselves) are unchanged.
        """
        if not args and "sync_dist" not in kwargs and self._epoch_level_only(value, kwargs):
            kwargs["sync_dist"] = True
        super().log(name, value, *args, **kwargs)

    def _epoch_level_only(self, value: Any, kwargs: dict[str, Any]) -> bool:
        from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator
        from torchmetrics import Metric

        fx = getattr(self, "_current_fx_name", None)
        if isinstance(value, Metric) or fx is None or self._trainer is None:
            return False
        try:
            on_step, on_epoch = _FxValidator.get_default_logging_levels(fx, kwargs.get("on_step"),
                                                                        kwargs.get("on_epoch"))
        except (AssertionError, KeyError):  # a hook Lightning does not log from: its own error follows
            return False
        return bool(on_epoch) and not on_step

    def configure_callbacks(self) -> list[lightning.Callback]:
        """The strategy, once: a trainer that already holds it (``test`` after ``fit``) gets nothing new,
        where Lightning would otherwise replace the strategy by itself and say so."""
        trainer = self._trainer
        if trainer is not None and any(c is self.strategy for c in trainer.callbacks):
            return []
        return [self.strategy]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._common_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._common_step(batch, "test")

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward; PyTorch's "backward through the graph a second time" explained."""
        try:
            super().backward(loss, *args, **kwargs)
        except RuntimeError as exc:
            if "backward through the graph a second time" not in str(exc):
                raise
            raise RuntimeError(
                f"the vector field uses a tensor computed before the solve with its autograd history (e.g. "
                f"a context computed from the batch by a submodule of the field, then used inside "
                f"forward); strategy {self.strategy!r} re-evaluates the field in its own backward pass, "
                f"so that history would be walked many times. Pass the context through the state "
                f"(concatenate it to y0 and return zeros for its channels), or, when it needs no gradient, "
                f"set it on the field per batch detached: docs/extending.md ('Your own vector field')"
            ) from exc

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse a non-finite gradient before it reaches the weights (never a silent NaN).

        Without this a NaN gradient is written into every parameter by the optimiser and
        surfaces one step later as a "non-finite state" at ``t=0``, far from its cause.
        Lightning calls this after accumulation and DDP's all-reduce (every rank raises
        together) and before gradient clipping. Exempt: fp16 mixed precision, whose GradScaler
        skips such steps by design.
        """
        if not self.check_finite_gradients or getattr(self.trainer, "scaler", None) is not None:
            return
        names = {id(p): name for name, p in self.named_parameters()}
        grads = [(names.get(id(p), "<unnamed>"), p.grad) for group in optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        finite = [bool(torch.isfinite(g.coalesce().values() if g.is_sparse else g).all()) for _, g in grads]
        if all(finite):
            return
        bad = [name for (name, _), ok in zip(grads, finite, strict=True) if not ok]
        raise FloatingPointError(
            f"non-finite gradient at training step {self.trainer.global_step} in {len(bad)} parameter "
            f"tensor(s): {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. The weights were not updated. "
            f"Check the loss for NaN/inf (log-densities of far-out points, divisions by zero), lower the "
            f"learning rate or tighten the solver tolerances, and clip gradients to keep them from blowing "
            f"up (trainer.gradient_clip_val=1.0; clipping runs after this check, so it cannot repair a NaN); "
            f"`python -m nde_zoo gradcheck` compares this strategy's gradient with backprop on one batch"
        )

    def configure_optimizers(self) -> Any:
        """AdamW; with ``lr_final_factor < 1`` a per-step cosine from ``lr`` to ``lr * lr_final_factor``."""
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        if self.lr_final_factor == 1 or not math.isfinite(total) or total <= 0:
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total),
                                                              eta_min=self.lr * self.lr_final_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    #: where pictures go at the end of ``fit``; the command line sets it to the run directory
    #: (``outputs/fit/<model>/<time>/``). None: the logger's directory, if any.
    picture_dir: Path | None = None

    def output_dir(self) -> Path | None:
        """Where pictures go at the end of ``fit``: :attr:`picture_dir`, else the logger's directory."""
        if self.picture_dir is not None:
            return Path(self.picture_dir)
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.logger is None or trainer.log_dir is None:
            return None
        return Path(trainer.log_dir)

    def nfe_figure(self, plt: Any) -> Any:
        """Forward/backward NFE per training step, or None where the NFE never changed (fixed steps:
        two flat lines say nothing the title does not)."""
        history = self.strategy.history
        if not history:
            return None
        from nde_zoo.pictures import nfe_varies, run_title

        if not nfe_varies(history):
            import logging

            last = history[-1]
            logging.getLogger("nde_zoo").info(
                "nfe_curve.png not drawn: the NFE was the same at every training step (%g forward, %g "
                "backward)",
                last.get("nfe/forward", 0.0), last.get("nfe/backward", 0.0))
            return None
        steps = [h["step"] for h in history]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("nfe/forward", "nfe/backward"):
            ax.plot(steps, [h[key] for h in history], label=key)
        ax.set_xlabel("training step")
        ax.set_ylabel("function evaluations per step")
        ax.set_title(run_title(self, "NFE per training step"), fontsize=7)
        ax.legend()
        fig.tight_layout()
        return fig

    def on_fit_end(self) -> None:
        """Plot forward/backward NFE per training step where it varies (skipped without matplotlib)."""
        out = self.output_dir()
        if out is None or not self.strategy.history or self.trainer.global_rank != 0:
            return
        from nde_zoo.pictures import pyplot

        plt = pyplot()
        if plt is None:  # the [plots] extra is optional
            return
        fig = self.nfe_figure(plt)
        if fig is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "nfe_curve.png", dpi=120)
        plt.close(fig)
