"""Run the command line in this process: ``run_cli("fit", ...)`` is ``python -m nde_zoo fit ...``
without the 5-8 s of torch, Lightning and Hydra imports a fresh interpreter pays.

It calls :func:`nde_zoo.cli.main`, the function ``python -m nde_zoo`` calls: the same argument
handling (subcommand, the checkpoint's saved overrides, the run-directory claim), the same
``@hydra.main`` (composition, run and sweep directories, ``.hydra/``, logging, callbacks) and the
same :func:`nde_zoo.train.run`. What a process boundary would have reset is saved and put back:
the working directory, ``sys.argv``, the environment, Hydra's singletons, the logging handlers
Hydra installs, torch's thread count and the random generators. Output goes to strings and the
result is a :class:`subprocess.CompletedProcess`, so a test reads ``returncode``, ``stdout`` and
``stderr`` as it would from the subprocess.

Not for what needs a process of its own: Lightning's subprocess DDP re-executes ``sys.argv``
(here, pytest), signals kill the process, launchers start several. Those tests spawn the command
line and carry ``@pytest.mark.spawns`` (tests/conftest.py refuses an unmarked spawn).

:func:`compose` is the other in-process route: Hydra's compose API for a test that wants the
config of a command line without running it (``train.run(sub, compose(sub, overrides))`` runs it
without Hydra's run directory).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import random
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: loggers whose handlers, level or propagation a run changes (Hydra's logging config, train.run)
_LOGGERS = ("", "hydra", "lightning", "lightning.pytorch", "lightning.fabric", "nde_zoo")


def _clear_hydra() -> None:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


@contextlib.contextmanager
def _isolated(cwd: Path, env: dict | None):
    """Put back, on exit, what a run changes for the whole process."""
    import numpy as np
    import torch

    saved_env = dict(os.environ)
    saved_argv = list(sys.argv)
    saved_cwd = os.getcwd()
    saved_threads = torch.get_num_threads()
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    saved_loggers = {
        name: (logging.getLogger(name), list(logging.getLogger(name).handlers), logging.getLogger(name).level,
               logging.getLogger(name).propagate, logging.getLogger(name).disabled)
        for name in _LOGGERS
    }
    _clear_hydra()
    os.environ.update(env or {})
    os.chdir(cwd)
    # as `python -m` would: the working directory and PYTHONPATH's entries come first on sys.path
    # (a downstream project's module named by a config's _target_ must import)
    saved_path = list(sys.path)
    extra = [str(cwd), *(p for p in (env or {}).get("PYTHONPATH", "").split(os.pathsep) if p)]
    sys.path[:0] = [p for p in extra if p not in sys.path]
    importlib.invalidate_caches()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(saved_cwd)
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path
        if dict(os.environ) != saved_env:
            os.environ.clear()
            os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        for logger, handlers, level, propagate, disabled in saved_loggers.values():
            for handler in logger.handlers:
                if handler not in handlers:
                    logger.removeHandler(handler)
                    with contextlib.suppress(Exception):
                        handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled
        _clear_hydra()


def run_cli(*args: str, cwd: Path | None = None, timeout: int | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m nde_zoo ARGS`` in this process; returns what the subprocess would have.

    ``returncode`` is the ``SystemExit`` code (0 for a return), 1 for an exception, whose
    traceback ends ``stderr``. ``timeout`` is accepted for the subprocess form's sake; the test's
    own time limit applies instead. ``env`` is added to the environment for the run; warnings are
    ignored unless it names ``PYTHONWARNINGS``, as the subprocess form runs with
    ``PYTHONWARNINGS=ignore``.
    """
    from nde_zoo import cli

    del timeout
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with _isolated(Path(cwd or REPO), env):
        warnings.simplefilter((env or {}).get("PYTHONWARNINGS", "ignore"))  # type: ignore[arg-type]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                cli.main([str(Path(cli.__file__).with_name("__main__.py")), *args])
            except SystemExit as exc:
                code = exc.code
            except Exception:  # noqa: BLE001  (an uncaught exception: the interpreter's exit status)
                traceback.print_exc()
                code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed to stderr, status 1
        stderr.write(f"{code}\n")
        code = 1
    return subprocess.CompletedProcess([sys.executable, "-m", "nde_zoo", *args], code, stdout.getvalue(),
                                       stderr.getvalue())


def compose(sub: str, overrides: list[str] | tuple[str, ...] = ()):
    """The config ``python -m nde_zoo SUB OVERRIDES`` composes (Hydra's compose API, with its
    ``hydra`` node), set as the current HydraConfig as ``@hydra.main`` would; clear it with
    tests/conftest.py's reset after the test."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from nde_zoo.cli import _inner_strategy_override
    from nde_zoo.configs_path import config_dir

    _clear_hydra()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=sub, overrides=[_inner_strategy_override(o) for o in overrides],
                            return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg
