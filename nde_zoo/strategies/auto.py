"""Auto: the fastest exact strategy whose memory fits a budget, measured on the real solve.

No strategy wins everywhere (``Direct`` while its graph fits, ``Checkpoint`` trading recomputation
for snapshots, ``Symplectic`` with ``N`` states and one stage's graph, ``Reversible`` flat in ``N`` at
a few times the cost): it depends on the field, the batch, ``N`` and the machine, so Auto measures.

1. On a training solve whose key is new (batch shape, dtype, device type, steps, field class),
   it *probes* every candidate on the real ``field`` and ``y0`` over two short prefixes of the
   grid (``k/2`` and ``k = probe_steps`` steps, with the output times inside): one forward and
   one backward each, measuring the most the allocator holds above its start in each phase (CUDA:
   ``max_memory_allocated``; CPU: :class:`nde_zoo.memory.AllocatorPeak`, so the field's transient
   activations count), and the seconds (best of three interleaved runs of the longer prefix).
2. It asks each candidate's class to extrapolate its probes to the full ``N``
   (``ODEStrategy.predict``: each strategy states its own memory and time model;
   :mod:`nde_zoo.strategies.plan`). Adaptive solves first count ``N`` with one gradient-free solve.
3. It chooses the fastest candidate whose predicted peak fits ``memory_budget`` (within
   :data:`TIE_MARGIN` of the fastest, the one keeping fewer states: timing noise does not flip
   the choice) and delegates this and every later solve with that key to it, so gradients are
   exactly the chosen strategy's. If none fits it raises :class:`MemoryBudgetError` naming the
   smallest predicted peak and what would make it fit, before any step runs out of memory.

Solves without gradients never probe: they use the latest choice (``Direct`` before any). The plans
are in :meth:`state_dict` (a resume, ``test ckpt_path=`` and ``load_from_checkpoint`` reuse them).
Under DDP rank 0 probes and broadcasts its plan. ``python -m nde_zoo plan`` prints the table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nde_zoo._distributed import any_rank, log_targets, log_to, on_rank_zero, rank
from nde_zoo.memory import Probe, available_memory, format_bytes, parse_bytes
from nde_zoo.memory import measure_solve as _measure
from nde_zoo.solvers import ButcherTableau, check_inputs, fixed_path, odeint
from nde_zoo.driver.autograd import NonDeterministicFieldError
from nde_zoo.strategies.base import ODEStrategy, Solution, exact_strategy_names, strategy_class, takes_stepping
from nde_zoo.strategies.plan import TIE_MARGIN, MemoryBudgetError, Plan, ProbeFit, Row, choose, probe_times

__all__ = ["Auto", "MemoryBudgetError", "Plan", "parse_bytes", "format_bytes", "choose", "CANDIDATES",
           "CHOICE_CODES", "TIE_MARGIN"]

log = logging.getLogger("nde_zoo")

#: the default candidates (config names); any exact strategy's name may be given (``exact_strategy_names``).
CANDIDATES = ("direct", "checkpoint", "symplectic", "reversible")
#: ``auto/choice`` as logged (a metric must be a number): the index of the chosen label here.
CHOICE_CODES = {label: i for i, label in enumerate([*CANDIDATES, *(f"{n}+compile" for n in CANDIDATES)])}
#: timed runs of each candidate's longer probe, interleaved across candidates (the best counts)
TIMING_ROUNDS = 3
#: plans kept per Auto (one per key); beyond it the latest choice serves new keys, with a warning.
MAX_PLANS = 16


class Auto(ODEStrategy):
    """Choose, by measuring, the fastest exact strategy whose memory fits ``memory_budget``.

    Args:
        solver, steps / step_size, rtol / atol / max_steps: as every ODE strategy; the chosen
            strategy solves with these.
        memory_budget: bytes, or a size such as ``"2GB"``, ``"1.5GiB"``; ``None``: the device's free
            memory (CUDA) or the machine's available memory (CPU). It bounds what the allocator
            holds during one solve's forward and backward, above what it held before.
        candidates: config names among ``direct``, ``checkpoint``, ``symplectic``, ``reversible``.
        compile: ``True``/``"strict"``/``"reduce-overhead"`` adds the compiled variant of every
            candidate (``direct+compile``, ...) for fixed steps (docs/compile.md).
        probe_steps: ``k``, the longest prefix probed (``k/2`` and ``k`` steps; at most ``N``).

    Gradient: exactly the chosen strategy's (each candidate is exact for its discretisation).
    Memory and time: the chosen one's, plus one probe per key (a few steps of each candidate).
    """

    name = "auto"
    compilable = True  # passes compile= to its candidates

    @takes_stepping
    def __init__(
        self,
        solver: str | ButcherTableau = "dopri5",
        *,
        memory_budget: int | float | str | None = None,
        candidates: Sequence[str] = CANDIDATES,
        probe_steps: int = 8,
        **stepping: Any,
    ) -> None:
        super().__init__(solver, **stepping)
        self.memory_budget = parse_bytes(memory_budget)
        if isinstance(candidates, str):
            candidates = [c.strip() for c in candidates.split(",")]
        candidates = tuple(str(c) for c in candidates)
        known = [*CANDIDATES, *(n for n in exact_strategy_names() if n not in CANDIDATES)]
        unknown = [c for c in candidates if c not in known]
        if unknown or not candidates:
            raise ValueError(f"unknown candidate(s) {', '.join(unknown) or '(none given)'} for strategy=auto; "
                             f"choose among {', '.join(known)} (the exact strategies)")
        self.candidates = candidates
        if int(probe_steps) != probe_steps or probe_steps < 2:
            raise ValueError(f"probe_steps must be an integer >= 2, got {probe_steps!r}")
        self.probe_steps = int(probe_steps)
        st = self.stepping  # what the candidates are built with (the compile choice apart)
        self._stepping_args = dict(steps=st.steps, step_size=st.step_size, rtol=st.rtol, atol=st.atol, max_steps=st.max_steps)
        self.plans: dict[str, Plan] = {}
        self._built: dict[str, ODEStrategy] = {}  # key -> the chosen strategy, built from its plan
        self._latest: str | None = None  # the key of the latest choice
        self._new_choice: str | None = None  # a key chosen during this training step (logged at its end)
        self.probes = 0  # how many plans this Auto measured (a resumed run measures none for known keys)
        self.announce, self._overflow_warned = True, False  # announce: log each new plan's table

    @property
    def chosen(self) -> ODEStrategy | None:
        """The strategy the latest choice delegates to (``None`` before the first choice)."""
        return None if self._latest is None else self._strategy_for(self._latest)

    @property
    def plan(self) -> Plan | None:
        """The plan of the latest choice (its table: ``plan.markdown()``)."""
        return None if self._latest is None else self.plans.get(self._latest)

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        times = check_inputs(y0, ts)
        key, steps = self._key(field, y0, times)
        if torch.is_grad_enabled() and len(times) >= 2 and len(self.plans) < MAX_PLANS:
            if any_rank(key not in self.plans, y0.device):  # under DDP every rank decides together
                self._decide(key, field, y0, ts, times, steps)
        elif key not in self.plans and torch.is_grad_enabled() and not self._overflow_warned:
            self._overflow_warned = True
            log.warning("strategy=auto: %d distinct solves (batch shape, dtype, device, steps) have been "
                        "planned; new ones (%s) use the latest choice without probing", MAX_PLANS, key)
        if key in self.plans:
            self._latest = key
            strategy = self._strategy_for(key)
        elif self._latest is not None:  # gradient-free: the latest choice's discretisation
            strategy = self._strategy_for(self._latest)
        else:  # gradient-free before any choice: keeps nothing for backward, any strategy fits
            strategy = self._build("direct", None)
        return self._record(strategy.solve(field, y0, ts, params=params))

    def _key(self, field: Any, y0: Tensor, times: list[float]) -> tuple[str, int | None]:
        if self.stepping.adaptive:
            n, what = None, f"span [{times[0]:g}, {times[-1]:g}] with {len(times)} outputs"
        else:
            n = fixed_path(times, self.stepping).steps
            what = f"{n} steps"
        shape, dtype = "x".join(str(s) for s in y0.shape), str(y0.dtype).removeprefix("torch.")
        return f"{type(field).__name__} with a {shape} {dtype} state on {y0.device.type}, {what}", n

    def _strategy_for(self, key: str) -> ODEStrategy:
        if key not in self._built:
            plan = self.plans[key]  # a plan is kept only with a choice
            self._built[key] = self._build(str(plan.choice), plan.snapshots)
        return self._built[key]

    def _build(self, label: str, snapshots: int | None, stepping: dict[str, Any] | None = None) -> ODEStrategy:
        name, _, compiled = label.partition("+")
        cls = strategy_class(name)
        kwargs = dict(self._stepping_args if stepping is None else stepping)
        # snapshots set a fixed-step schedule (a plan loaded from a fixed-step run may carry them)
        kwargs.update(cls.planned_arguments(None if self.stepping.adaptive else snapshots, bool(compiled)))
        return cls(self.tableau, compile=self.compile if compiled else False, **kwargs)

    def _decide(self, key: str, field: Any, y0: Tensor, ts: Tensor, times: list[float], steps: int | None) -> None:
        """Probe (rank 0 under DDP), choose, and keep the plan; raise if nothing fits."""
        plan = Plan.from_dict(on_rank_zero(lambda: self.measure(field, y0, ts, times, steps, key).to_dict(),
                                           "strategy=auto: probing"))
        self.probes += 1
        if plan.choice is None:
            raise MemoryBudgetError(plan.no_fit_message(), plan)
        self.plans[key] = plan
        self._new_choice = key
        if self.announce and rank() == 0:  # once per key, not once per rank; under ddp_spawn, where
            log_to(log, getattr(self, "_log_targets", []), plan.markdown())  # the launcher logged

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_log_targets"] = log_targets(log)  # for a process spawned from this one (DDP)
        return state

    def measure(self, field: Any, y0: Tensor, ts: Tensor, times: list[float] | None = None,
                steps: int | None = None, key: str | None = None) -> Plan:
        """Probe every candidate on ``(field, y0, ts)`` and return the plan (``plan.choice`` is
        ``None`` when nothing fits). Called by :meth:`solve`; public for ``plan`` and the bench."""
        times = check_inputs(y0, ts) if times is None else times
        if key is None or (steps is None and not self.stepping.adaptive):
            key, steps = self._key(field, y0, times)
        budget = self.memory_budget if self.memory_budget is not None else available_memory(y0.device)
        estimated = steps is None
        if steps is None:  # adaptive: count the steps of one gradient-free solve (keeps nothing)
            with torch.no_grad():
                _, path, _ = odeint(field, y0.detach(), ts, self.tableau, self.stepping)
            grid = path.times
            steps = max(path.steps, 1)
        else:
            grid = fixed_path(times, self.stepping).times
        k2 = min(steps, self.probe_steps)
        k1 = max(1, k2 // 2)
        labels = list(self.candidates)
        if self.compile.enabled and not self.stepping.adaptive:
            labels += [f"{c}+compile" for c in self.candidates if strategy_class(c).compilable]
        probed = {label: self._probe(label, field, y0, ts, grid, k1, k2) for label in labels}
        refusals = [p for p in probed.values() if isinstance(p, Exception)]
        if len(refusals) == len(probed):  # refused by all: the field's own error (a wrong shape, ...)
            raise refusals[0]
        # Seconds: the longer probe again, round by round across candidates (a busy moment hits all alike)
        prefix, stepping = self._prefix(ts, grid, k2)
        timed = {label: self._build(label, None, stepping) for label, probes in probed.items()
                 if isinstance(probes, list)}
        for _ in range(TIMING_ROUNDS):
            for label, strategy in timed.items():
                run = _measure(strategy, field, y0, prefix, repeats=0, memory=False)
                longer = probed[label][-1]
                longer.forward, longer.backward = min(longer.forward, run.forward), min(longer.backward, run.backward)
        state_bytes = y0.nelement() * y0.element_size()
        rows = [self._predict(label, probed[label], steps, len(times), state_bytes, budget) for label in labels]
        plan = Plan(key=key, steps=steps, estimated=estimated, budget=budget, device=str(y0.device), rows=rows)
        best, plan.tie = choose(rows, steps)
        if best is not None:
            plan.choice, plan.snapshots = best.label, best.snapshots
        return plan

    def _prefix(self, ts: Tensor, grid: list[float], k: int) -> tuple[Tensor, dict[str, Any]]:
        """A probe over the first ``k`` steps of ``grid``: its output times and stepping."""
        stepping = dict(self._stepping_args)
        if not self.stepping.adaptive:
            stepping.update(steps=k, step_size=None)
        return probe_times(ts, grid, k), stepping

    def _probe(self, label: str, field: Any, y0: Tensor, ts: Tensor, grid: list[float], k1: int,
               k2: int) -> list[Probe] | str | Exception:
        """``label`` measured on the first ``k1`` and ``k2`` steps; why not (out of memory, a refusal)."""
        probes: list[Probe] = []
        try:
            for k in dict.fromkeys((k1, k2)):  # one probe when k1 == k2
                prefix, stepping = self._prefix(ts, grid, k)
                # built with no snapshots: a checkpointing candidate's predict() costs its counts
                probes.append(_measure(self._build(label, None, stepping), field, y0, prefix, repeats=0))
        except torch.OutOfMemoryError:
            if y0.device.type == "cuda":
                torch.cuda.empty_cache()
            return "out of memory while probing"
        except (ValueError, NonDeterministicFieldError) as exc:  # this candidate refuses the field
            return exc
        return probes

    def _predict(self, label: str, probes: list[Probe] | str | Exception, steps: int, outputs: int,
                 state_bytes: int, budget: int) -> Row:
        """The candidate's own model (``ODEStrategy.predict``) at the full solve, as a row."""
        if not isinstance(probes, list):  # out of memory (a note), or the candidate refused the field
            note = probes if isinstance(probes, str) else f"refused: {str(probes).splitlines()[0]}"
            return Row(label, math.inf, math.inf, False, note=note)
        name, _, compiled = label.partition("+")
        fit = ProbeFit(probes, steps, outputs, state_bytes, self.stepping.adaptive)
        cost = strategy_class(name).predict(fit, budget, bool(compiled))
        return Row(label, cost.peak, cost.seconds, cost.peak <= budget, snapshots=cost.snapshots,
                   probes=[p.as_dict() for p in probes], detail=cost.detail, flat=cost.flat)

    # -- Lightning: log the choice, keep the plans -----------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        chosen = self.chosen
        if chosen is not None and chosen.programs.pending_seconds:  # its compile seconds, logged as ours
            self.programs.pending_seconds += chosen.programs.pending_seconds
            chosen.programs.pending_seconds = 0.0
        if self._new_choice is not None:
            # once, at the step that chose, straight to the loggers (pl_module.log would repeat it)
            plan = self.plans[self._new_choice]
            code = float(CHOICE_CODES.get(plan.choice or "direct", len(CHOICE_CODES)))  # beyond: a strategy of yours
            connector = getattr(trainer, "_logger_connector", None)
            if connector is not None:
                connector.log_metrics({"auto/choice": code})
            else:
                for logger in trainer.loggers:
                    logger.log_metrics({"auto/choice": code}, step=trainer.global_step)
            trainer.callback_metrics["auto/choice"] = torch.tensor(code)
            self._new_choice = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def state_dict(self) -> dict[str, Any]:
        return {"plans": {k: p.to_dict() for k, p in self.plans.items()}, "latest": self._latest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plans = {k: Plan.from_dict(p) for k, p in state_dict.get("plans", {}).items()}
        self._built.clear()
        latest = state_dict.get("latest")
        self._latest = latest if latest in self.plans else None
        if self._latest is not None:  # a resume says what it restored, in the log and the metrics
            plan = self.plans[self._latest]
            snapshots = f" (snapshots={plan.snapshots})" if plan.snapshots is not None else ""
            log.info("strategy=auto: restored the choice %s%s for %s from the checkpoint (no probing)",
                     plan.choice or "none", snapshots, self._latest)
            self._new_choice = self._latest

    def __repr__(self) -> str:
        budget = "available memory" if self.memory_budget is None else format_bytes(self.memory_budget)
        chosen = f", chosen={self.plan.choice}" if self.plan is not None else ""
        return (f"Auto(solver={self.tableau.name!r}, {self.stepping.describe()}, memory_budget={budget}, "
                f"candidates={','.join(self.candidates)}{chosen})")
