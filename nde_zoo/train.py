"""What each subcommand does once Hydra has composed the config."""

from __future__ import annotations

import logging
import pickle
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from nde_zoo.checkpoints import (
    CheckpointError,
    VerifiedCheckpointIO,
    _process_rank,
    claim_run_dir,
    claimed_here,
    migrate_checkpoint,
    pickled_objects_message,
    remove_stale_temp_files,
    verify_checksum,
)

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

    try:  # safely, as Lightning loads it: a pickled object (a field given as a module) is named here
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SystemExit(
            f"error: {pickled_objects_message(path, f'ckpt_path={cfg.ckpt_path}', exc, command_line=True)}"
        ) from None
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
    migrate_checkpoint(checkpoint, f"ckpt_path={cfg.ckpt_path} ({path})", log_only=True)  # newer: say so
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


def build(cfg: DictConfig, resume_from: str | None = None) -> tuple[Any, Any, Any]:
    """Instantiate ``(datamodule, model, strategy)`` from a composed config.

    ``resume_from``: the checkpoint a ``fit`` resumes; when its gradient strategy differs from the
    config's, :func:`_resume_strategy` decides which one the model gets and says so.
    """
    datamodule = hydra.utils.instantiate(cfg.data)
    strategy = hydra.utils.instantiate(cfg.strategy)
    inherited = None
    if resume_from is not None:
        strategy, inherited = _resume_strategy(resume_from, strategy)
    model = instantiate_model(cfg.model, strategy)
    if inherited is not None:  # the checkpoint's strategy was kept: the run's config and checkpoints say so
        from nde_zoo.strategies.config import strategy_config

        model._inherited_overrides = inherited
        with open_dict(cfg):
            cfg.strategy = strategy_config(strategy)
    return datamodule, model, strategy


def instantiate_model(model_cfg: DictConfig, strategy: Any) -> Any:
    """The model of ``model_cfg`` with ``strategy``; its arguments reach it as plain values, configs unbuilt.

    Hydra would build a nested ``_target_`` (``model.field={_target_: my_project.MyField, ...}``)
    before the model sees it, and the model would save the built module in its hyperparameters:
    a pickled object that ``torch.load(weights_only=True)`` refuses (``fit``'s final test, ``test
    ckpt_path=``, a resume). Given the config, the model builds the field itself and saves the config.
    """
    return hydra.utils.instantiate(model_cfg, strategy=strategy, _recursive_=False, _convert_="all")


def _is_strategy_override(override: str) -> bool:
    key = str(override).split("=", 1)[0].lstrip("+~")
    return key == "strategy" or key.startswith(("strategy.", "strategy/", "strategy@"))


def _same_config(a: Any, b: Any) -> bool:
    import json

    def canonical(x: Any) -> str:
        return json.dumps(x, sort_keys=True, default=repr)

    return canonical(a) == canonical(b)


def _describe_state(name: str, state: Any) -> str:
    """What a strategy's saved state holds, in words."""
    if not isinstance(state, dict) or not state:
        return f"{name}'s state (empty)"
    if "plans" in state:  # Auto
        plans = state.get("plans") or {}
        chosen = sorted({str(p["choice"]) for p in plans.values() if isinstance(p, dict) and p.get("choice")})
        which = f", chosen: {', '.join(chosen)}" if chosen else ""
        return f"Auto's plan ({len(plans)} planned solve(s){which})"
    if "previous_times" in state:  # LocalERNODE
        inner = state.get("inner")
        return (
            f"ERNODE's regulariser state (its coefficient schedule at training step {state.get('step')}, its "
            f"sampling RNG and {len(state.get('previous_times') or [])} previous solve times"
            + (f"; and its inner strategy's: {_describe_state('the inner strategy', inner)}" if inner else "")
            + ")"
        )
    return f"{name}'s state ({', '.join(map(str, state))})"


def _resume_strategy(ckpt_path: str, strategy: Any) -> tuple[Any, list[str] | None]:
    """The gradient strategy a resumed ``fit`` trains with, and (when it is the checkpoint's, not the
    config's) the checkpoint's overrides that name it.

    A checkpoint names the strategy it was trained with (its hyperparameters hold its config).
    When the config's strategy differs from it: without a ``strategy`` override on the command
    line the checkpoint's is kept (the config's is only the default); with one, the given strategy
    is used. Either way a warning names both, and a change says what strategy state is dropped
    (ERNODE's regulariser schedule, Auto's plan). Called from Python without Hydra, the config's
    strategy counts as given.
    """
    import torch

    from nde_zoo.strategies.config import strategy_config, strategy_from_config

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    hparams = (checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    saved = hparams.get("strategy")
    if not isinstance(saved, dict) or "_target_" not in saved:
        return strategy, None  # not a zoo model's checkpoint: nothing to compare with
    try:
        old = strategy_from_config(saved)
        old_text, old_key, old_name = repr(old), old.state_key, type(old).__name__
        saved = strategy_config(old)  # with this version's defaults for arguments it did not save
    except Exception as exc:  # its class is gone or changed
        old, old_name = None, str(saved["_target_"]).rpartition(".")[2]
        old_text = f"{saved['_target_']} (cannot be built here: {type(exc).__name__}: {exc})"
        old_key = f"GradientStrategy[{old_name}]"
    if _same_config(saved, strategy_config(strategy)):
        return strategy, None
    given = [str(o) for o in HydraConfig.get().overrides.task if _is_strategy_override(o)] \
        if HydraConfig.initialized() else None
    if not given and old is not None:
        log.warning(
            "ckpt_path=%s was trained with gradient strategy %s, and the config's is %s: resuming with the "
            "checkpoint's, since no strategy= was given. To change it, pass strategy=<name> (and its "
            "settings); the state the checkpoint's strategy saved is then dropped",
            ckpt_path, old_text, repr(strategy),
        )
        overrides = ((checkpoint.get("nde_zoo") or {}).get("overrides") or [])
        return old, [str(o) for o in overrides if _is_strategy_override(o)]
    state = (checkpoint.get("callbacks") or {}).get(old_key)
    if old_key == strategy.state_key:
        what = (f"the state it saved, {_describe_state(old_name, state)}, is loaded into the new one" if state
                else "it saved no state")
    else:
        what = (f"dropped: {_describe_state(old_name, state)}" if state
                else "it saved no state, so none is dropped")
    why = (f"given: {' '.join(given)}" if given else "the config's strategy was given from Python"
           if given is None else "the checkpoint's cannot be built, so the config's is used")
    log.warning(
        "resuming ckpt_path=%s with gradient strategy %s instead of the checkpoint's %s (%s); %s",
        ckpt_path, repr(strategy), old_text, why, what,
    )
    return strategy, None


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
    from nde_zoo.quiet import install as quiet_third_party
    from nde_zoo.shorthands import apply_memory_budget, apply_model_stepping

    quiet_third_party()  # Lightning's litlogger tip and treespec deprecation, filtered by name (nde_zoo/quiet.py)
    apply_memory_budget(sub, cfg)  # memory_budget= is strategy.memory_budget (auto), in every subcommand
    stepping = apply_model_stepping(cfg)  # the model's own stepping where the command line gives none
    if HydraConfig.initialized():  # Hydra's handlers print and file Lightning's messages once
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # `lightning` has its own too
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    if cfg.get("cpu_threads"):
        import torch

        torch.set_num_threads(int(cfg.cpu_threads))
    if stepping:
        log.info("the model's stepping: %s (its config's `stepping`; strategy.steps=, strategy.solver= or "
                 "strategy.rtol= on the command line choose your own)",
                 ", ".join(f"{k}={v}" for k, v in stepping.items()))
    lightning.seed_everything(cfg.seed, workers=True)
    datamodule, model, strategy = build(cfg, resume_from=ckpt_path if sub == "fit" else None)
    if ckpt_path is not None:
        _check_checkpoint_model(ckpt_path, model)
    if sub == "gradcheck":
        return _gradcheck(cfg, datamodule, strategy)
    if sub == "plan":
        return _plan(cfg, datamodule, model, strategy)
    run_dir = _run_dir()
    if sub == "fit" and HydraConfig.initialized() and not claimed_here(run_dir):  # never into another run's
        claim_run_dir(run_dir, ckpt_path)  # directory (the command line claims it before Hydra writes there)
    # the strategy it trains with (a checkpoint's, or with the model's stepping)
    if (hasattr(model, "_inherited_overrides") or stepping) and HydraConfig.initialized():
        _rewrite_saved_config(cfg)
    if sub == "fit" and _process_rank() == 0:  # what processes killed mid-save left behind
        folders = {run_dir / "checkpoints"} if HydraConfig.initialized() else set()
        folders |= {Path(ckpt_path).parent} if ckpt_path is not None else set()
        for folder in sorted(folders):
            remove_stale_temp_files(folder)
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


def _rewrite_saved_config(cfg: DictConfig) -> None:
    """Hydra saved ``.hydra/config.yaml`` before the run kept its checkpoint's strategy: write it again."""
    subdir = HydraConfig.get().output_subdir
    if subdir is None or _process_rank() != 0:
        return
    path = Path(HydraConfig.get().runtime.output_dir) / subdir / "config.yaml"
    try:
        OmegaConf.save(cfg, path)
    except Exception as exc:  # noqa: BLE001  (the run goes on; its checkpoints name the strategy)
        log.warning("could not record the checkpoint's strategy in %s: %s: %s", path, type(exc).__name__, exc)


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
    errors = gradient_fidelity(lambda s: instantiate_model(cfg.model, s), strategy, batch, cfg.seed)
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
