"""What each subcommand does once Hydra has composed the config."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from nde_zoo.checkpoints import CheckpointError, VerifiedCheckpointIO, claim_run_dir, verify_checksum

log = logging.getLogger("nde_zoo")

__all__ = ["run", "build"]


def _run_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra (called from Python)
        return Path.cwd()


def _check_ckpt_path(sub: str, cfg: DictConfig) -> str | None:
    """``validate``/``test``/``predict`` need an existing checkpoint; say so plainly."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
        if sub == "fit":
            return None
        raise SystemExit(
            f"error: {sub} needs a checkpoint: pass ckpt_path=<file.ckpt>, e.g. "
            f"ckpt_path=outputs/fit/<model>/<time>/checkpoints/last.ckpt"
        )
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_absolute():
        path = Path(hydra.utils.get_original_cwd()) / path if HydraConfig.initialized() else path.resolve()
    if not path.is_file():
        raise SystemExit(f"error: ckpt_path={cfg.ckpt_path} does not exist ({path})")
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say so before Lightning does it obscurely
        raise SystemExit(
            f"error: ckpt_path={cfg.ckpt_path} is not a readable checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); it may be truncated by a killed run: use another one, "
            f"e.g. checkpoints/last.ckpt of the same run"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SystemExit(f"error: ckpt_path={cfg.ckpt_path} is not a Lightning checkpoint (it has no state_dict)")
    try:  # flipped bytes load silently otherwise
        verify_checksum(checkpoint, f"ckpt_path={cfg.ckpt_path} ({path})")
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    return str(path)


def _check_checkpoint_model(ckpt_path: str, model: Any) -> None:
    """A checkpoint of another model family: say which, before Lightning's state-dict error."""
    import torch

    from nde_zoo.models.base import NeuralDE

    if isinstance(model, NeuralDE):
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        try:
            NeuralDE.check_checkpoint_model(checkpoint, type(model), f"ckpt_path={ckpt_path}")
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None


def build(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """Instantiate ``(datamodule, model, strategy)`` from a composed config."""
    datamodule = hydra.utils.instantiate(cfg.data)
    strategy = hydra.utils.instantiate(cfg.strategy)
    model = hydra.utils.instantiate(cfg.model, strategy=strategy)
    return datamodule, model, strategy


def _trainer(cfg: DictConfig, run_dir: Path) -> lightning.Trainer:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    # Checkpoints written atomically, read back and checksummed; a failed save stops the fit.
    plugins = None if cfg.trainer.get("plugins") else [VerifiedCheckpointIO()]
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir), plugins=plugins
    )


def run(sub: str, cfg: DictConfig) -> Any:
    """Run ``fit``/``validate``/``test``/``predict``/``gradcheck`` on the composed config."""
    ckpt_path = _check_ckpt_path(sub, cfg) if sub not in ("gradcheck", "plan") else None
    from nde_zoo.shorthands import apply_memory_budget

    apply_memory_budget(sub, cfg)  # memory_budget= is strategy.memory_budget (auto), in every subcommand
    if HydraConfig.initialized():  # Hydra's handlers print and file Lightning's messages once
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # `lightning` has its own too
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    if cfg.get("cpu_threads"):
        import torch

        torch.set_num_threads(int(cfg.cpu_threads))
    lightning.seed_everything(cfg.seed, workers=True)
    datamodule, model, strategy = build(cfg)
    if ckpt_path is not None:
        _check_checkpoint_model(ckpt_path, model)
    if sub == "gradcheck":
        return _gradcheck(cfg, datamodule, strategy)
    if sub == "plan":
        return _plan(cfg, datamodule, model, strategy)
    run_dir = _run_dir()
    if sub == "fit" and HydraConfig.initialized():  # never into another run's directory
        claim_run_dir(run_dir, ckpt_path)
    model.picture_dir = run_dir  # pictures next to checkpoints and logs, as the README says
    trainer = _trainer(cfg, run_dir)
    log.info("model %s with gradient strategy %r; outputs in %s", type(model).__name__, strategy, run_dir)
    if sub == "fit":
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # Lightning stops after the current step and saves nothing
            raise SystemExit(_stopped_by_sigterm(trainer)) from None
        except CheckpointError as exc:  # the first save that failed, or a corrupted resume
            raise SystemExit(f"error: {exc}") from None
        if not cfg.get("test_after_fit", True):
            return trainer.callback_metrics
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        _summarise(results, best)
        return results
    if sub == "validate":
        return trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if sub == "test":
        return trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path)
    predictions = trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path)
    import torch

    out = run_dir / "predictions.pt"
    torch.save(predictions, out)
    log.info("predictions written to %s", out)
    return predictions


def _stopped_by_sigterm(trainer: lightning.Trainer) -> int:
    """Say where a fit stopped by SIGTERM resumes from; the exit status of a SIGTERM (143), not 0."""
    lasts = [Path(c.dirpath) / "last.ckpt" for c in trainer.checkpoint_callbacks
             if isinstance(c, ModelCheckpoint) and c.dirpath]
    last = next((p for p in lasts if p.is_file()), None)
    log.warning(
        "fit stopped by SIGTERM in epoch %d at step %d; %s", trainer.current_epoch, trainer.global_step,
        f"resume with ckpt_path={last}" if last else "no checkpoint had been written yet",
    )
    return 128 + signal.SIGTERM


def _summarise(results: list[dict[str, float]], best: str) -> None:
    if not results:
        return
    figures = ", ".join(f"{k} = {v:.4g}" for k, v in sorted(results[0].items()))
    log.info("test with %s: %s", best or "the final weights", figures)


def _gradcheck(cfg: DictConfig, datamodule: Any, strategy: Any) -> dict[str, float]:
    from nde_zoo.fidelity import gradient_fidelity

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    errors = gradient_fidelity(lambda s: hydra.utils.instantiate(cfg.model, strategy=s), strategy, batch, cfg.seed)
    print(f"relative gradient error of {strategy!r} vs float64 Direct on the same discretisation:")
    for group, err in errors.items():
        print(f"  {group:>12}: {err:.3e}")
    return errors


def _plan(cfg: DictConfig, datamodule: Any, model: Any, strategy: Any) -> Any:
    """Probe ``strategy=auto``'s candidates on one training batch of the real model; print the table."""
    import warnings

    import torch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from nde_zoo.strategies import Auto, MemoryBudgetError

    if not isinstance(strategy, Auto):
        raise SystemExit(
            f"error: plan measures strategy=auto's candidates, but strategy={strategy.name or type(strategy).__name__} "
            f"was given; drop strategy= (set the stepping with strategy.solver=, strategy.steps= or strategy.rtol=, "
            f"the candidates with 'strategy.candidates=[direct,reversible]')"
        )
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    device = torch.device("cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu")
    datamodule.setup("fit")
    batch = move_data_to_device(next(iter(datamodule.train_dataloader())), device)
    model.to(device).train()
    strategy.announce = False  # printed below, once
    failure = None
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer
        try:
            model._common_step(batch, "train")
        except MemoryBudgetError as exc:
            failure = exc
    plans = list(strategy.plans.values()) + ([failure.plan] if failure is not None else [])
    text = "\n\n".join(p.markdown() for p in plans)
    print(text)
    out = _run_dir() / "plan.md"
    if HydraConfig.initialized():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        log.info("plan written to %s", out)
    if failure is not None:
        raise SystemExit(f"error: {str(failure).splitlines()[0]}")
    return plans
