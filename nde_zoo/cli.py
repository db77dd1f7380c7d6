"""``nde-zoo`` / ``python -m nde_zoo``: subcommands in front of a Hydra app.

    python -m nde_zoo fit model=cnf strategy=reversible
    python -m nde_zoo test ckpt_path=outputs/.../checkpoints/last.ckpt
    python -m nde_zoo fit -m strategy=direct,symplectic        # Hydra multirun
    python -m nde_zoo bench white_dwarf [--quick]              # benchmarks (not Hydra)

Hydra has no subcommands, so the first word is taken off ``sys.argv`` before
``@hydra.main`` parses it and selects the primary config (``configs/<subcommand>.yaml``);
in run mode the original argv is put back, because Lightning's DDP launcher re-executes
``sys.argv`` for ranks > 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

TRAIN_SUBCOMMANDS = ("fit", "validate", "test", "predict")
OTHER_SUBCOMMANDS = ("bench", "gradcheck", "plan", "table")
USAGE = """usage: nde-zoo <subcommand> [hydra overrides...]

subcommands:
  fit        train a model (then test it with the best checkpoint)
  validate   evaluate a checkpoint on the validation split   (needs ckpt_path=...)
  test       evaluate a checkpoint on the test split         (needs ckpt_path=...)
  predict    predict with a checkpoint                       (needs ckpt_path=...)
  gradcheck  compare one batch's gradient with float64 backprop, per parameter group
  plan       which strategy fits a memory budget: probe strategy=auto's candidates on one batch
  bench      run a benchmark: nde-zoo bench NAME [--quick]  (nde-zoo bench --list)
  table      one table (sweep.csv, sweep.md) of every run under a folder: nde-zoo table multirun/fit/<time>

examples:
  nde-zoo fit model=cnf strategy=reversible
  nde-zoo fit model=ode_classifier strategy=ernode strategy.inner=symplectic
  nde-zoo plan model=cnf strategy.steps=100 memory_budget=2GB
  nde-zoo fit --cfg job                      # print the composed config
  nde-zoo fit --help                         # config groups and their options
"""


def _fail(message: str) -> None:
    print(USAGE + f"\nerror: {message}", file=sys.stderr)
    raise SystemExit(2)


def _shell_completion(args: list[str]) -> tuple[str, list[str]] | None:
    """Hydra's bash completion (``nde-zoo -sc query=bash``): complete the subcommand word."""
    words = os.environ.get("COMP_LINE", "").split()
    if len(words) <= 1 or (len(words) == 2 and not os.environ.get("COMP_LINE", "").endswith(" ")):
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(s for s in (*TRAIN_SUBCOMMANDS, *OTHER_SUBCOMMANDS) if s.startswith(prefix)))
        return None
    sub = words[1]
    if sub not in TRAIN_SUBCOMMANDS + ("gradcheck", "plan"):
        return None
    os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (
        " " if os.environ["COMP_LINE"].endswith(" ") else ""
    )
    return sub, args


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv if argv is None else argv)
    prog, args = argv[0], argv[1:]
    if args[:1] in (["-sc"], ["--shell-completion"]):
        completed = _shell_completion(args)
        if completed is None:
            return None
        sub, rest = completed
    elif not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else 2)
    elif args[0] == "bench":
        from nde_zoo.bench.runner import main as bench_main

        return bench_main(args[1:])
    elif args[0] == "table":
        from nde_zoo.sweeps import main as table_main

        raise SystemExit(table_main(args[1:]))
    elif args[0] not in TRAIN_SUBCOMMANDS + ("gradcheck", "plan"):
        _fail(
            f"unknown subcommand {args[0]!r}; choose one of "
            f"{', '.join(TRAIN_SUBCOMMANDS + OTHER_SUBCOMMANDS)}"
        )
        return None
    else:
        sub, rest = args[0], args[1:]
    rest = [_inner_strategy_override(a) for a in rest]
    if sub in ("validate", "test", "predict"):
        rest = [*saved_overrides(rest), *rest]
    argv = [prog, sub, *rest]
    # Hydra parses sys.argv[1:]; a fit claims its run directory before Hydra writes into it.
    completing = args[:1] in (["-sc"], ["--shell-completion"])
    sys.argv = [prog, *(_with_override(rest, CLAIM_CALLBACK) if sub == "fit" and not completing else rest)]
    return _hydra_app(sub, argv)


#: the Hydra callback that makes ``fit`` claim its run directory first (nde_zoo.checkpoints.ClaimRunDir).
CLAIM_CALLBACK = "++hydra.callbacks.claim_run_dir._target_=nde_zoo.checkpoints.ClaimRunDir"

#: Hydra's options that take a value (``--cfg job``): the value is not an override.
_VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                  "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def _with_override(args: list[str], override: str) -> list[str]:
    """``args`` with ``override`` added where Hydra's parser accepts it: next to the user's
    overrides (argparse takes the overrides as one run of positionals, so one placed after an
    option, ``-m a=1 --cfg job X``, would be refused), or at the end when there are none."""
    expects_value = False
    for i, arg in enumerate(args):
        if expects_value:
            expects_value = False
            continue
        if arg.startswith("-"):
            expects_value = arg in _VALUE_OPTIONS
            continue
        return [*args[:i], override, *args[i:]]
    return [*args, override]


def _inner_strategy_override(arg: str) -> str:
    """``strategy.inner=reversible`` -> ``strategy@strategy.inner=reversible``: choose ERNODE's inner
    strategy config (configs/strategy/ernode.yaml's defaults), so ``strategy.inner.steps=10`` etc. apply
    to it. Hydra's own spelling, ``strategy@strategy.inner=<name>``, works as well.
    """
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") != "strategy.inner":
        return arg
    from nde_zoo.configs_path import config_dir

    names = {p.stem for p in (config_dir() / "strategy").glob("*.yaml")}
    if value and all(v.strip() in names for v in value.split(",")):
        return f"strategy@strategy.inner={value}"
    return arg


#: the config keys a checkpoint's run decides (and validate/test/predict repeat from it).
RUN_KEYS = ("model", "data", "strategy")


def _override_key(override: str) -> str:
    """``model.width`` of ``model.width=8``, ``strategy/inner@strategy.inner`` of ``+strategy/...=x``."""
    return override.split("=", 1)[0].lstrip("+~")


def _run_overrides(ckpt_path: Path) -> list[str] | None:
    """The fit's command-line overrides: saved in the checkpoint, else in the run's ``.hydra/``."""
    import torch

    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # train.py reports an unreadable checkpoint with its own message
        return None
    saved = checkpoint.get("nde_zoo") if isinstance(checkpoint, dict) else None
    if isinstance(saved, dict) and saved.get("overrides") is not None:
        return [str(o) for o in saved["overrides"]]
    for parent in list(ckpt_path.resolve().parents)[:3]:  # <run>/checkpoints/x.ckpt (older checkpoints)
        file = parent / ".hydra" / "overrides.yaml"
        if file.is_file():
            from omegaconf import OmegaConf

            return [str(o) for o in OmegaConf.load(file)]
    return None


def saved_overrides(args: list[str]) -> list[str]:
    """The overrides of the run that wrote ``ckpt_path=`` which decide model, data and strategy.

    ``validate``/``test``/``predict ckpt_path=...`` put them before the user's own, so the
    checkpoint is evaluated with the model, data and strategy it was trained with and the user
    repeats nothing; an override the user gives still applies (a group the user chooses again,
    e.g. ``data=...``, drops the run's settings inside that group).
    """
    given = [a.split("=", 1)[1] for a in args if a.startswith("ckpt_path=")]
    if not given or not given[-1]:
        return []
    path = Path(given[-1]).expanduser()
    if not path.is_file():
        return []
    overrides = _run_overrides(path)
    if not overrides:
        return []
    user_keys = {_override_key(a) for a in args if "=" in a and not a.startswith("-")}
    user_groups = {k for k in user_keys if "." not in k}
    if "model" in user_groups:  # another model brings its own default data
        user_groups.add("data")

    def kept(override: str) -> bool:
        key = _override_key(override)
        if key in user_keys or key.split(".")[0].split("/")[0].split("@")[0] not in RUN_KEYS:
            return False
        top = key.split("@")[-1].split(".")[0].split("/")[0]
        return not any(top == g or key.startswith(g + ".") or key.startswith(g + "/") for g in user_groups)

    chosen = [o for o in overrides if kept(o)]
    if chosen:
        print(f"nde_zoo: the checkpoint's run was configured with: {' '.join(chosen)} "
              f"(later overrides on this command line win)", file=sys.stderr)
    return chosen


def _hydra_app(sub: str, argv: list[str]) -> Any:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from nde_zoo.configs_path import config_dir

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=sub)
    def app(cfg: DictConfig) -> Any:
        if HydraConfig.get().mode == RunMode.RUN:
            sys.argv = argv  # Lightning's DDP launcher replays sys.argv for ranks > 0
        else:
            _refuse_replayed_ddp(cfg)
        from nde_zoo.train import run

        return run(sub, cfg)

    return app()


def _refuse_replayed_ddp(cfg: Any) -> None:
    """In a multirun, Lightning's subprocess DDP would replay the whole sweep: refuse it."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    strategy = cfg.trainer.get("strategy", "auto")
    if not isinstance(strategy, str):  # a strategy object (e.g. DDPStrategy with a timeout: docs/reliability.md)
        target = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else ""
        spawn = str(strategy.get("start_method", "popen")) != "popen" if hasattr(strategy, "get") else False
        strategy = "ddp_spawn" if spawn else "ddp" if target.endswith("DDPStrategy") else target
    if strategy.startswith("ddp") and not strategy.startswith("ddp_spawn"):
        if not (SLURMEnvironment.detect() or TorchElasticEnvironment.detect()):
            raise SystemExit(
                f"error: a multirun (-m) with trainer.strategy={strategy} would make Lightning "
                f"re-launch the whole sweep in every rank. Use trainer.strategy=ddp_spawn for local "
                f"sweeps, launch the processes with torchrun or srun, or submit the sweep to SLURM "
                f"with hydra/launcher=slurm"
            )


if __name__ == "__main__":  # pragma: no cover
    main()
