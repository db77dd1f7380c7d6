"""Local ERNODE regularisation: learn dynamics that are cheaper to solve (Pal et al., ICML 2023).

A wrapper around any ODE strategy (Pal, Edelman & Rackauckas, ICML 2023; the authors' LocalRegNeuralDE.jl). Each
training step it samples one time ``t_reg``, takes the state the inner solve reaches there,
makes ONE step of an embedded RK pair (tsit5 by default) with the step size the solve
uses at that time, and returns

    coef * err * |dt|,   err = RMS(error / (atol + rtol * max(|y|, |y_next|)))

from :meth:`regularisation`: the local error estimate an adaptive solver would see. Lowering
it lets the adaptive solver take larger steps at test time. The main solve keeps its inner
strategy's gradient method; the one extra step is differentiated by ordinary autograd.

Sampling:
- ``"unbiased"``: ``t_reg`` uniform on ``[ts[0], ts[-1]]``, added to the inner solve's output
  times (the solver core lands on it exactly; its step sizes move slightly).
- ``"biased"``: ``t_reg`` uniform among the accepted step times of the inner solve of the
  *previous* training step (the current solve's steps are unknown before it runs; the
  dynamics change little between steps); the first step samples as ``"unbiased"``.

When: only solves with gradients enabled sample (a training step; Lightning's validation,
test and predict loops run without gradients), so inference is untouched and pays nothing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from nde_zoo.solvers import fixed_path, get_tableau, initial_step_size, rk_step
from nde_zoo.solvers.stepping import error_ratio
from nde_zoo.strategies.base import GradientStrategy, ODEStrategy, Solution
from nde_zoo.strategies.sde import ernode_sde_regularisation, ernode_solve_sde

__all__ = ["LocalERNODE"]

SAMPLINGS = ("unbiased", "biased")
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-6


def _strategy_from_config(name: str) -> GradientStrategy:
    """Build a strategy from ``configs/strategy/<name>.yaml`` (what ``strategy=<name>`` gives)."""
    from hydra.utils import instantiate

    from nde_zoo.configs_path import config_dir

    folder = config_dir() / "strategy"
    valid = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "ernode")
    if name == "ernode":
        raise ValueError("LocalERNODE cannot wrap itself; choose an inner strategy from " + ", ".join(valid))
    if name not in valid:
        raise ValueError(f"unknown inner strategy {name!r} for ernode; valid inner strategies: {', '.join(valid)}")
    cfg = OmegaConf.load(folder / f"{name}.yaml")
    # what its defaults list merges in first: the shared stepping block (configs/strategy_stepping.yaml)
    included = [OmegaConf.load(folder.parent / f"{entry.split('@')[0].lstrip('/')}.yaml")
                for entry in cfg.pop("defaults", []) if entry != "_self_"]
    return instantiate(OmegaConf.merge(*included, cfg))


def _with_compile(inner: GradientStrategy, compile: bool | str) -> GradientStrategy:
    """``inner`` with its ``compile=`` set (LocalERNODE's own ``compile`` argument)."""
    from nde_zoo.driver.programs import CompileSpec, Programs

    spec = CompileSpec.of(compile)
    if spec.enabled and not getattr(inner, "compilable", False):
        from nde_zoo.strategies.base import COMPILABLE

        raise ValueError(
            f"LocalERNODE(compile={compile!r}) passes compile to its inner strategy, and {inner.name!r} has no "
            f"compiled path; compile is available for {', '.join(COMPILABLE)}"
        )
    if isinstance(inner, ODEStrategy):
        inner.compile, inner.programs = spec, Programs(spec, inner.name)
    return inner


def _as_rng_state(state: Any) -> tuple:
    """``random.Random`` state from a checkpoint (lists may come back where tuples went in)."""
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)


class LocalERNODE(GradientStrategy):
    """Wrap ``inner`` and add Pal et al.'s local error regulariser in training.

    Args:
        inner: a strategy, or the config name of one (``"reversible"``: its default config).
        sampling: ``"unbiased"`` or ``"biased"`` (see the module docstring).
        coef_start / coef_end / decay_steps: the coefficient decays exponentially (geometric
            interpolation) from ``coef_start`` to ``coef_end`` over ``decay_steps`` training steps,
            then stays at ``coef_end``.
        error_solver: the embedded pair whose error estimate is regularised.
        seed: seeds the sampler (plus the global rank under DDP, so ranks sample differently).

    Gradient: the inner strategy's for the solve, plain autograd for the one extra step.
    Memory and cost: the inner's plus one step of ``error_solver``.
    """

    name = "ernode"
    kinds = frozenset({"ode", "sde"})  # an instance supports what its inner strategy supports

    def __init__(
        self,
        inner: GradientStrategy | str = "direct",
        sampling: str = "unbiased",
        coef_start: float = 2.5,
        coef_end: float = 1.0,
        decay_steps: int = 1000,
        error_solver: str = "tsit5",
        seed: int = 0,
        compile: bool | str | None = None,
    ) -> None:
        super().__init__()
        self.inner = _strategy_from_config(inner) if isinstance(inner, str) else inner
        if isinstance(self.inner, LocalERNODE):
            raise ValueError("LocalERNODE cannot wrap another LocalERNODE")
        if not isinstance(self.inner, GradientStrategy):
            raise TypeError(f"inner must be a GradientStrategy or a config name, got {type(inner).__name__}")
        if compile is not None:  # passed to the inner strategy (None: keep the inner's own setting)
            self.inner = _with_compile(self.inner, compile)
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if not (coef_start >= coef_end > 0):
            raise ValueError(f"need coef_start >= coef_end > 0, got coef_start={coef_start}, coef_end={coef_end}")
        if int(decay_steps) != decay_steps or decay_steps < 1:
            raise ValueError(f"decay_steps must be a positive integer, got {decay_steps!r}")
        self.error_tableau = get_tableau(error_solver)
        if not self.error_tableau.adaptive:
            raise ValueError(f"error_solver {error_solver!r} has no embedded error estimate; use tsit5, dopri5 or bosh3")
        self.kinds = self.inner.kinds & LocalERNODE.kinds
        self.sampling = sampling
        self.coef_start, self.coef_end, self.decay_steps = float(coef_start), float(coef_end), int(decay_steps)
        self.seed = int(seed)
        self.step = 0  # training steps taken: the schedule's position
        # A plain Python generator: picklable for ddp_spawn (a torch.Generator is not) and cheap.
        self.rng = random.Random(self.seed)
        self._previous_times: list[float] = []
        self._reg_sum: float | None = None  # this training step's regularisation, summed (bounded)

    # -- the schedule ---------------------------------------------------------------------
    @property
    def coef(self) -> float:
        progress = min(self.step, self.decay_steps) / self.decay_steps
        return self.coef_start * (self.coef_end / self.coef_start) ** progress

    # -- solving ---------------------------------------------------------------------------
    def _tolerances(self) -> tuple[float, float]:
        if isinstance(self.inner, ODEStrategy) and self.inner.stepping.adaptive:
            return float(self.inner.stepping.rtol or 0.0), float(self.inner.stepping.atol or 0.0)
        return DEFAULT_RTOL, DEFAULT_ATOL

    def _sample_time(self, times: list[float]) -> float:
        t0, t1 = times[0], times[-1]
        u = self.rng.random()
        if self.sampling == "biased" and self._previous_times:
            k = int(u * len(self._previous_times))
            return self._previous_times[min(k, len(self._previous_times) - 1)]
        if isinstance(self.inner, ODEStrategy) and self.inner._compiles():
            # A compiled fixed-step inner keeps its grid, so its program is reused: the sampled
            # time is the nearest step boundary (uniform over the grid for uniform steps).
            grid = fixed_path(times, self.inner.stepping).times
            return grid[min(int(u * (len(grid) - 1)), len(grid) - 2)]
        return t0 + u * (t1 - t0)

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        # params= only when given: an inner strategy written before it existed keeps working
        named = {} if params is None else {"params": params}
        if not torch.is_grad_enabled() or ts.numel() < 2:
            return self.inner.solve(field, y0, ts, **named)
        times = ts.tolist()
        t_reg = self._sample_time(times)
        if t_reg in times:
            index, ts_aug = times.index(t_reg), ts
        else:
            increasing = times[-1] > times[0]
            index = sum(1 for t in times if (t < t_reg if increasing else t > t_reg))
            ts_aug = torch.cat([ts[:index], ts.new_tensor([t_reg]), ts[index:]])
        solution = self.inner.solve(field, y0, ts_aug, **named)
        ys = solution.ys if ts_aug is ts else torch.cat([solution.ys[:index], solution.ys[index + 1:]])
        path = solution.path
        if path is not None:
            self._previous_times = list(path.times[:-1])  # step starts, for biased sampling
            k = path.output_steps[index]
            h = path.sizes[k] if k < path.steps else path.sizes[-1]
            if k == path.steps:  # sampled the end: step back over the last step's span
                h = -h
        else:  # the continuous adjoints do not expose their steps: Hairer's starting step there
            h = self._hairer_step(field, ts_aug[index], solution.ys[index].detach(), times)
        extras = dict(solution.extras)
        extras["ernode"] = {"field": field, "t": ts_aug[index], "y": solution.ys[index], "h": h}
        return Solution(ys, ts, solution.stats, path, solution.saved_bytes, extras)

    def solve_sde(self, sde: Any, y0: Tensor, ts: Tensor, bm: Any, dt: float | None = None) -> Solution:
        """SDEs: the step-doubling local error of one SDE step (:func:`nde_zoo.strategies.sde.ernode_solve_sde`)."""
        return ernode_solve_sde(self, sde, y0, ts, bm, dt)

    def _hairer_step(self, field: Any, t: Tensor, y: Tensor, times: list[float]) -> float:
        rtol, atol = self._tolerances()
        with torch.no_grad():
            h = initial_step_size(field, t, y, field(t, y), self.error_tableau.order - 1, rtol, atol)
        direction = 1.0 if times[-1] > times[0] else -1.0
        return direction * min(h, abs(times[-1] - times[0]))

    def regularisation(self, solution: Solution) -> Tensor:
        """``coef * err * |dt|`` at the sampled time; zero when the solve did not sample."""
        if "ernode_sde" in solution.extras:
            return ernode_sde_regularisation(self, solution)
        sample = solution.extras.get("ernode")
        if sample is None:
            return solution.ys.new_zeros(())
        rtol, atol = self._tolerances()
        y, h = sample["y"], sample["h"]
        result = rk_step(sample["field"], sample["t"], y, h, self.error_tableau)
        assert result.error is not None
        err = error_ratio(result.error, y, result.y, rtol, atol)
        value = self.coef * err * abs(h)
        self._note_value(value)
        return value

    def _note_value(self, value: Tensor) -> None:
        """Add a regularisation term to this step's logged ``reg/value`` (a running sum: bounded)."""
        self._reg_sum = (self._reg_sum or 0.0) + float(value.detach())

    # -- Lightning: delegate to the inner strategy, log the schedule ---------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.step == 0:  # a fresh run: per-rank stream (a resumed one restores its state)
            self.rng.seed(self.seed + trainer.global_rank)
        self.inner.setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._reg_sum = None
        self.inner.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._reg_sum is not None:
            pl_module.log("reg/value", self._reg_sum, on_step=True, on_epoch=False, batch_size=1)
            self._reg_sum = None
        pl_module.log("reg/coef", self.coef, on_step=True, on_epoch=False, batch_size=1)
        self.inner.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.history = self.inner.history
        self.step += 1

    def _stop_recording(self) -> None:
        super()._stop_recording()
        self.inner._stop_recording()  # the inner strategy is not a registered callback itself

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rng": self.rng.getstate(),
            "previous_times": list(self._previous_times),
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.rng.setstate(_as_rng_state(state_dict["rng"]))
        self._previous_times = list(state_dict["previous_times"])
        self.inner.load_state_dict(state_dict.get("inner", {}))

    def __repr__(self) -> str:
        return (f"LocalERNODE(inner={self.inner!r}, sampling={self.sampling!r}, coef {self.coef_start}->"
                f"{self.coef_end} over {self.decay_steps} steps, error_solver={self.error_tableau.name!r})")
