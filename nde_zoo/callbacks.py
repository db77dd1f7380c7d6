"""Lightning callbacks of the zoo that are not gradient strategies.

:class:`StepTimer` logs the seconds per training step, the compile seconds and the peak memory
once per epoch (the columns of the sweep table, nde_zoo/sweeps.py). The other two make a resumed
``fit`` end where the uninterrupted run ends (configs/callbacks/default.yaml registers them):
:class:`ResumableSeeds` makes every random draw of training a function of ``(seed, epoch, batch)``;
:class:`ResumableCheckpoint` keeps ranking the best checkpoints across a resume into a new run
directory.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Mapping
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, RandomSampler

log = logging.getLogger("nde_zoo")

__all__ = ["ResumableCheckpoint", "ResumableSeeds", "StepTimer", "compile_seconds", "derived_seed"]


def derived_seed(seed: int, *key: int) -> int:
    """A well-mixed 32-bit seed for ``key`` (``(epoch,)`` or ``(epoch, batch_idx)``) of run ``seed``."""
    # The key's length goes in too: SeedSequence pads its entropy with zeros, so [s, e] and [s, e, 0]
    # would mix to the same state.
    return int(np.random.SeedSequence([seed, len(key), *key]).generate_state(1)[0])


def _loaders(iterables: Any) -> list[DataLoader]:
    """The DataLoaders in ``trainer.train_dataloader`` (one loader, or a list/dict of them)."""
    if isinstance(iterables, DataLoader):
        return [iterables]
    if isinstance(iterables, Mapping):
        iterables = list(iterables.values())
    if isinstance(iterables, (list, tuple)):
        return [dl for item in iterables for dl in _loaders(item)]
    return []


class ResumableSeeds(lightning.Callback):
    """Make every random draw of training a function of ``(seed, epoch, batch)``.

    Lightning restores weights, optimiser, schedulers, loop counters and each callback's
    ``state_dict`` (a strategy's own state, such as LocalERNODE's schedule and sampler) from a
    checkpoint, but not the global random generators, so a run resumed from ``last.ckpt``
    would shuffle the training set and draw its noise differently from the run it continues.
    This callback removes that dependence on history:

    - at ``on_train_epoch_start`` it gives the training DataLoader's ``RandomSampler`` (what
      ``shuffle=True`` builds) a generator seeded with ``derived_seed(seed, epoch)``; the
      sampler reads it when the epoch's first batch is fetched, after this hook;
    - at ``on_train_batch_start`` it seeds Python's ``random``, NumPy's and torch's global
      generators (the CPU one, and every CUDA device's once CUDA is in use) with
      ``derived_seed(seed, epoch, batch_idx)``, so the noise a training step draws (Hutchinson's
      probes of the CNF, the latent ODE's reparameterisation, dropout) and the validation after
      the epoch's last step do not depend on what ran before (Lightning draws from torch's
      generator when it creates a DataLoader iterator, at a point that differs between a fresh
      and a resumed run).

    A run resumed at an epoch boundary (where ``last.ckpt`` is written) then ends with the same
    weights and metrics as the uninterrupted run, bit for bit on the CPU
    (tests/test_resume.py). Every rank gets the same seeds, as with ``seed_everything``;
    under DDP Lightning's ``DistributedSampler`` replaces the ``RandomSampler`` and shards the
    data with its own ``(seed, epoch)``. Limits: a sampler that already has a generator of its
    own is left alone (with a warning); DataLoader workers (``num_workers > 0``) fetch the
    first indices when the iterator is created, before this hook, and are not covered (the
    zoo's datamodules load in the main process); a run restarted in the middle of an epoch
    (Lightning calls no ``on_train_epoch_start`` then) shuffles the rest of that epoch anew.

    Args:
        seed: the run's seed (``seed`` of the config), an integer in ``[0, 2**32)``.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        self.seed = int(seed)
        # What the training samplers shuffle with; made in the first epoch, so that the callback
        # pickles before ``fit`` (ddp_spawn) with any torch version.
        self._generator: torch.Generator | None = None
        self._warned = False

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._generator is None:
            self._generator = torch.Generator()
        for loader in _loaders(trainer.train_dataloader):
            sampler = loader.sampler
            if not isinstance(sampler, RandomSampler):
                continue  # sequential, or a DistributedSampler (Lightning calls its set_epoch)
            if sampler.generator is not None and sampler.generator is not self._generator:
                if not self._warned:
                    rank_zero_warn(
                        "ResumableSeeds: the training DataLoader's RandomSampler has a generator of its own; "
                        "its shuffle order is left to it, and a resumed run may not see the batches the "
                        "uninterrupted run would have seen"
                    )
                    self._warned = True
                continue
            sampler.generator = self._generator
        self._generator.manual_seed(derived_seed(self.seed, trainer.current_epoch))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        value = derived_seed(self.seed, trainer.current_epoch, batch_idx)
        random.seed(value)
        np.random.seed(value)
        # Not torch.manual_seed: it queues lazy seeds for uninitialised CUDA/XPU/MPS with a formatted
        # stack trace each, 0.25 ms a step.
        torch.default_generator.manual_seed(value)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(value)

    def __repr__(self) -> str:
        return f"ResumableSeeds(seed={self.seed})"


class ResumableCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ranking of the best checkpoints survives a resume into a new directory.

    ``fit ckpt_path=<old run>/checkpoints/last.ckpt`` writes into a new run directory. There,
    Lightning's ``ModelCheckpoint`` reloads only ``best_model_path`` and forgets the scores, so
    the resumed run's first checkpoint becomes the "best" even when it is worse than the best
    before the kill, and the test at the end of ``fit`` would use it. This one also reloads the
    scores (``best_model_score``, ``best_k_models``, ``kth_value``), so the test uses the same
    checkpoint as the uninterrupted run would. Files of the old directory stay where they are:
    Lightning only deletes checkpoints inside its own ``dirpath`` and never the one it resumed
    from. Arguments: those of ``ModelCheckpoint``.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)


def compile_seconds(strategy: Any) -> float:
    """Seconds a strategy spent compiling so far: its own programs', its inner strategy's (ERNODE) and
    its chosen candidate's (Auto)."""
    total, seen, todo = 0.0, set(), [strategy]
    while todo:
        s = todo.pop()
        if s is None or id(s) in seen:
            continue
        seen.add(id(s))
        programs = getattr(s, "programs", None)
        total += float(getattr(programs, "compile_seconds", 0.0) or 0.0)
        todo += [getattr(s, "inner", None), getattr(s, "chosen", None)]
    return total


class StepTimer(lightning.Callback):
    """Log, once per training epoch, what a sweep compares runs by.

    - ``time/step_s``: the median wall-clock seconds of the epoch's training steps (from the start
      of a batch to its end: forward, backward, optimiser; on a GPU after a synchronisation). The
      median leaves out a step that compiled or warmed up;
    - ``time/compile_s``: the seconds the gradient strategy has spent compiling so far
      (``strategy.compile=true``; 0 otherwise), cumulative;
    - ``memory/peak_bytes``: the largest memory figure of any training step of the epoch: the CUDA
      peak (``memory/cuda_peak_bytes``) on a GPU, the bytes autograd kept for backward
      (``memory/saved_bytes``) on the CPU;
    - ``time/first_step_s`` (the process's first epoch only): seconds from the command's start
      (``nde_zoo.STARTED``) to the end of its first training step: imports, data, the model, and
      the first compile with ``strategy.compile=true``. It is also logged as a line when it ends,
      so a cold and a warm compile cache are compared from the logs alone.

    Epoch-level, so the CSV logger writes every epoch's value whatever ``log_every_n_steps`` is.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0
        self._steps: list[float] = []
        self._peak = 0.0
        self._first_step_s: float | None = None  # this process's first training step, once
        self._first_logged = False

    @staticmethod
    def _sync(pl_module: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _read_memory(self, trainer: Any) -> None:
        metrics = trainer.callback_metrics
        for key in ("memory/cuda_peak_bytes", "memory/saved_bytes"):
            if key in metrics:
                self._peak = max(self._peak, float(metrics[key]))

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._steps, self._peak = [], 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync(pl_module)
        self._steps.append(time.perf_counter() - self._start)
        self._read_memory(trainer)  # this step's figures, or the previous one's (callback order)
        if self._first_step_s is None:
            import nde_zoo

            self._first_step_s = time.perf_counter() - nde_zoo.STARTED
            compiling = compile_seconds(getattr(pl_module, "strategy", None))
            if trainer.is_global_zero:
                log.info("first training step done %.1f s after the command started%s", self._first_step_s,
                         f" ({compiling:.1f} s of it compiling)" if compiling else "")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._steps:
            return
        self._read_memory(trainer)
        # the same keys on every rank (under DDP they are reduced together): 0 where nothing was measured
        figures = {"time/step_s": statistics.median(self._steps),
                   "time/compile_s": compile_seconds(getattr(pl_module, "strategy", None)),
                   "memory/peak_bytes": self._peak}
        if self._first_step_s is not None and not self._first_logged:  # every rank: its first epoch
            figures["time/first_step_s"], self._first_logged = self._first_step_s, True
        for key, value in figures.items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True, batch_size=1)

    def __repr__(self) -> str:
        return "StepTimer()"
