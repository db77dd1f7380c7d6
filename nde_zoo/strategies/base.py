"""The contract between models and gradient strategies.

A :class:`GradientStrategy` turns ``(field, y0, ts)`` into a :class:`Solution` whose
``ys`` is differentiable with respect to ``y0`` and the field's parameters *by that
strategy's own method*. It is a ``lightning.Callback``: the model owns it and returns it
from ``configure_callbacks()``, and it logs its own figures (NFE, memory) per training step.
"""

from __future__ import annotations

import abc
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning
import torch
from torch import Tensor

from nde_zoo.memory import LiveSaved, SavedBytes
from nde_zoo.solvers import ButcherTableau, SolveStats, Stepping, check_inputs, get_tableau
from nde_zoo.solvers.stepping import DEFAULT_MAX_STEPS
from nde_zoo.driver.fields import field_parameters, inspect_field
from nde_zoo.driver.loop import Run, solve
from nde_zoo.driver.programs import CompileSpec, Programs
from nde_zoo.strategies.config import init_arguments
from nde_zoo.strategies.plan import Cost, ProbeFit
from nde_zoo.strategies.solution import Solution, _Record

__all__ = ["Solution", "GradientStrategy", "ODEStrategy", "SavedBytes", "LiveSaved", "field_parameters"]

#: At most this many solves are recorded per training step (their figures are summed at its end).
MAX_RECORDS_PER_STEP = 10_000
#: ``GradientStrategy.history`` keeps at most this many entries: beyond it, every other one goes
#: and only every ``2**k``-th training step is kept from then on, so the NFE plot stays even.
MAX_HISTORY = 10_000


class GradientStrategy(lightning.Callback, abc.ABC):
    """How a model's gradient through a differential equation solve is computed.

    Subclasses declare ``kinds`` (``"ode"`` and/or ``"sde"``) and implement :meth:`solve`.
    As a Lightning callback a strategy logs ``nfe/forward``, ``nfe/backward`` and
    ``memory/saved_bytes`` (CPU) or ``memory/cuda_peak_bytes`` (GPU) each training step,
    and keeps whatever it schedules in :meth:`state_dict`.
    """

    kinds: ClassVar[frozenset[str]] = frozenset()
    #: config name, e.g. ``"reversible"`` (used in error messages and the capability matrix).
    name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> GradientStrategy:
        # Record the constructor's arguments, so the strategy can be saved as a config
        # (nde_zoo.strategies.config.strategy_config; models keep it in their hyperparameters).
        self = super().__new__(cls)
        self._init_arguments = init_arguments(cls, args, kwargs)
        return self

    def __init__(self) -> None:
        super().__init__()
        #: the solves of the training step under way (lightweight records, see :meth:`_record`).
        self._solutions: list[_Record] = []
        self._recording = False
        #: the figures logged at each training step (``{"step": ..., "nfe/forward": ...}``),
        #: kept for plots at the end of ``fit``; thinned beyond ``MAX_HISTORY`` entries.
        self.history: list[dict[str, float]] = []
        self._history_stride = 1

    @abc.abstractmethod
    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        """Solve ``dy/dt = field(t, y)`` from ``y0`` at ``ts[0]``; outputs at every ``ts``.

        ``field`` may be an ``nn.Module`` or any callable (a closure, a ``functools.partial``, a
        bound method): the parameters it reads are found (:mod:`nde_zoo.driver.fields`), or
        given as ``params`` (like torchdiffeq's ``adjoint_params``).
        """

    def regularisation(self, solution: Solution) -> Tensor:
        """A term to add to the training loss; zero unless the strategy adds one."""
        return solution.ys.new_zeros(())

    def _record(self, solution: Solution) -> Solution:
        """Note a solve's cost for the figures of the training step under way; return ``solution``.

        Bounded whatever the caller does: only between Lightning's ``on_train_batch_start`` and
        ``on_train_batch_end`` (so plain-PyTorch loops, ``validate``, ``test`` and ``predict``
        keep nothing), only a :class:`_Record` (stats, saved bytes, extras; never ``ys`` or its
        graph), and at most ``MAX_RECORDS_PER_STEP`` per step (with a warning beyond).
        """
        if not getattr(self, "_recording", False):
            return solution
        if len(self._solutions) < MAX_RECORDS_PER_STEP:
            self._solutions.append(_Record(solution.stats, solution.saved_bytes, solution.extras))
        elif len(self._solutions) == MAX_RECORDS_PER_STEP:
            self._solutions.append(_Record(SolveStats(), 0, {}))  # a marker: warn once per step
            warnings.warn(
                f"{type(self).__name__}: more than {MAX_RECORDS_PER_STEP} solves in one training step; the "
                f"nfe/memory figures logged for this step count only the first {MAX_RECORDS_PER_STEP}",
                stacklevel=2,
            )
        return solution

    def _stop_recording(self) -> None:
        self._solutions.clear()
        self._recording = False

    # -- Lightning callback hooks ------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return f"GradientStrategy[{type(self).__name__}]"

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._solutions.clear()
        self._recording = True
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        records, self._solutions = self._solutions, []
        self._recording = False
        if not records:
            return
        figures = {
            "nfe/forward": float(sum(s.stats.nfe_forward for s in records)),
            "nfe/backward": float(sum(s.stats.nfe_backward for s in records)),
        }
        if pl_module.device.type == "cuda":
            figures["memory/cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated(pl_module.device))
        else:
            figures["memory/saved_bytes"] = float(sum(s.saved_bytes for s in records))
        pl_module.log_dict(figures, on_step=True, on_epoch=False, batch_size=1)
        self._append_history({"step": float(trainer.global_step), **figures})

    def _append_history(self, entry: dict[str, float]) -> None:
        """Keep ``entry`` if its step is on the current stride; halve the history beyond ``MAX_HISTORY``."""
        stride = getattr(self, "_history_stride", 1)
        if int(entry["step"]) % stride:
            return
        self.history.append(entry)
        if len(self.history) > MAX_HISTORY:
            self._history_stride = stride = 2 * stride
            self.history[:] = [h for h in self.history if int(h["step"]) % stride == 0]

    # A training step that never reaches on_train_batch_end (an exception, a hook returning -1)
    # must not leave recording on for what follows.
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_recording()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop_recording()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop_recording()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: the strategies with a compiled path (``compile=``), named in the refusal of the others.
COMPILABLE = ("direct", "checkpoint", "reversible", "symplectic")
_BY_NAME: dict[str, type[ODEStrategy]] = {}


def strategy_class(name: str) -> type[ODEStrategy]:
    """The ODE strategy class whose config name is ``name`` (``"reversible"`` -> Reversible)."""
    if name not in _BY_NAME:
        raise ValueError(f"no ODE strategy is named {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def exact_strategy_names() -> list[str]:
    """The config names of the ODE strategies whose gradient is exact (``exact = True``)."""
    return [name for name, cls in _BY_NAME.items() if cls.exact]


class ODEStrategy(GradientStrategy):
    """A strategy that runs an explicit RK method of the solver core.

    Args (the stepping: a subclass takes its own arguments and passes these on as ``**stepping``):
        solver: a name from :func:`nde_zoo.solvers.solver_names` or a :class:`ButcherTableau`.
        steps / step_size: fixed stepping (``steps`` uniform steps over ``[ts[0], ts[-1]]``).
        rtol / atol / max_steps: adaptive stepping (the default, ``rtol=1e-3``, ``atol=1e-6``).
        compile: ``False`` (eager, the reference), ``True``, ``"strict"`` or ``"reduce-overhead"``:
            run the solve's loops as compiled programs (docs/compile.md). Strategies whose
            ``compilable`` is false refuse anything but ``False``.
    """

    kinds = frozenset({"ode"})
    #: whether this strategy has a compiled path (``compile=True``).
    compilable: ClassVar[bool] = False
    #: whether its gradient is exact for its discretisation (then Auto may choose it, by ``name``).
    exact: ClassVar[bool] = False
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):  # a strategy with a config name: Auto can build it by that name
            _BY_NAME.setdefault(cls.name, cls)

    @classmethod
    def predict(cls, fit: ProbeFit, budget: int, compiled: bool) -> Cost:
        """This strategy's memory and time model: its peak bytes and seconds for the full solve,
        extrapolated from two short probes (:class:`~nde_zoo.strategies.plan.ProbeFit`), which is
        all :class:`~nde_zoo.strategies.Auto` knows of it. The default: a graph or a state per step,
        linear in ``N`` (Direct, Symplectic); a strategy with another shape overrides this."""
        return Cost(max(fit.grows("forward_peak"), fit.grows("backward_peak")), fit.seconds())

    @classmethod
    def planned_arguments(cls, snapshots: int | None, compiled: bool) -> dict[str, Any]:
        """The constructor arguments that build the strategy :meth:`predict` costed (its ``snapshots``)."""
        return {}

    def __init__(
        self,
        solver: str | ButcherTableau = "dopri5",
        *,
        steps: int | None = None,
        step_size: float | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        compile: bool | str = False,
        **unexpected: Any,
    ) -> None:
        if unexpected:  # subclasses pass their stepping on as **stepping: name the class the user called
            takes = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
            raise TypeError(f"{type(self).__name__} got an unexpected argument {next(iter(unexpected))!r}; it "
                            f"takes: {', '.join(takes)}")
        super().__init__()
        self.tableau = get_tableau(solver)
        self.stepping = Stepping.of(
            steps=steps, step_size=step_size, rtol=rtol, atol=atol, max_steps=max_steps
        )
        self.stepping.check(self.tableau)
        self.compile = CompileSpec.of(compile)
        if self.compile.enabled and not self.compilable:
            raise ValueError(
                f"strategy {self.name or type(self).__name__!r} has no compiled path (it runs torchdiffeq); "
                f"compile={compile!r} is available for {', '.join(COMPILABLE)}. Use one of those, or compile=False"
            )
        #: the compiled programs of this strategy (compile counts and seconds; ``compile/seconds``).
        self.programs = Programs(self.compile, self.name or type(self).__name__)

    def _compiles(self) -> bool:
        """Whether this solve runs the compiled loops: ``compile=`` on and fixed steps."""
        return self.compile.enabled and not self.stepping.adaptive

    def drive(self, scheme: Any, field: Any, y0: Tensor, ts: Tensor, params: Sequence[Tensor] | None = None,
              **run: Any) -> Any:
        """Run ``scheme`` through the solve driver (:mod:`nde_zoo.driver.loop`): ``(ys, stats, path)``.

        The inputs are checked, and for a scheme with its own backward the field is inspected
        (:func:`~nde_zoo.driver.fields.inspect_field`: the tensors it reads become the
        differentiated ``params``, unless given)."""
        times = check_inputs(y0, ts)
        params = [] if scheme.keeps == "graph" else inspect_field(field, ts[0], y0, self.name, params=params)
        compiled = self.compile.enabled
        return solve(Run(scheme, field, params, self.stepping, times, ts[0], self.name,
                         programs=self.programs if compiled and not self.stepping.adaptive else None,
                         adaptive_programs=self.programs if compiled and self.stepping.adaptive else None,
                         **run), y0)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.programs.pending_seconds:
            pl_module.log("compile/seconds", self.programs.pending_seconds, on_step=True, on_epoch=False,
                          batch_size=1)
            self.programs.pending_seconds = 0.0
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def __repr__(self) -> str:
        extra = f", compile={self.compile}" if self.compile.enabled else ""
        return f"{type(self).__name__}(solver={self.tableau.name!r}, {self.stepping.describe()}{extra})"


def _public_signature(init: Any, extra: list[inspect.Parameter]) -> inspect.Signature:
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in own}
    return inspect.Signature(own + [p for p in extra if p.name not in names])


# ODEStrategy's signature without its catch-all (**unexpected only names a wrong argument)
ODEStrategy.__init__.__signature__ = _public_signature(ODEStrategy.__init__, [])  # type: ignore[attr-defined]


def takes_stepping(init: Any) -> Any:
    """Decorate a strategy's ``__init__(self, solver, *, own..., **stepping)``: its signature then
    lists the stepping arguments its ``**stepping`` passes on to :class:`ODEStrategy` (``steps``,
    ``step_size``, ``rtol``, ``atol``, ``max_steps``, ``compile``), for ``help()``, the saved
    config (:func:`~nde_zoo.strategies.config.init_arguments`) and the config drift test.
    The stepping arguments are written once, in :class:`ODEStrategy`."""
    stepping = [p for p in inspect.signature(ODEStrategy.__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY]
    init.__signature__ = _public_signature(init, stepping)
    return init
