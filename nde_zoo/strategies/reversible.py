"""Algebraically reversible solvers: exact gradients with memory flat in the number of steps.

McCallum & Foster, "Efficient, Accurate and Stable Gradients for Neural ODEs" (2024,
arXiv:2410.11648) and Foster's talk "Reversible solvers for NDEs" (2024). Any explicit RK step ``Phi_h`` with increment
``Psi_h(t, x) = Phi_h(t, x) - x`` becomes reversible by carrying two states,
``Y_0 = Z_0 = y0``:

    Y_{n+1} = lam Y_n + (1 - lam) Z_n + Psi_h(t_n, Z_n)
    Z_{n+1} = Z_n - Psi_{-h}(t_{n+1}, Y_{n+1})

The solution is ``Y``; the scheme keeps the base method's order. Backwards the step
inverts algebraically,

    Z_n = Z_{n+1} + Psi_{-h}(t_{n+1}, Y_{n+1})
    Y_n = (Y_{n+1} - (1 - lam) Z_n - Psi_h(t_n, Z_n)) / lam,

so the backward pass rebuilds each step from the next and backpropagates through that one
step locally: nothing of the trajectory is stored. Both increments are evaluated *with* a
graph during the rebuild, so each serves the reconstruction and its vector-Jacobian
product at once: ``2 s`` evaluations and 2 VJPs per step backward, ``2 s`` forward.

The rebuild is exact up to round-off. It checks itself: at ``t0`` the true ``y0`` is known,
so the distance between the rebuilt and the true ``y0`` is logged
(``reversible/reconstruction_error``) and a warning names the knobs when it is large.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import torch
from torch import Tensor

from nde_zoo.solvers import (
    ButcherTableau,
    CountedField,
    Path,
    SolveStats,
    Stepping,
    check_finite_outputs,
    check_inputs,
    fixed_path,
    hairer_first_step,
    integrate,
    rk_increment,
)
from nde_zoo.solvers.stepping import DEFAULT_MAX_STEPS
from nde_zoo.strategies._autograd import _detached, _identity, check_no_hidden_inputs
from nde_zoo.strategies._compiled import (
    Grid,
    Programs,
    _fresh,
    adaptive_step,
    func_vjp,
    functional_field,
    functional_names,
    row,
    scan,
    scan_forward,
)
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution
from nde_zoo.strategies.fields import inspect_field
from nde_zoo.strategies.sde import solve_sde

__all__ = ["Reversible"]


@dataclass
class _Problem:
    """What the autograd Function needs besides its tensor inputs."""

    field: Any
    params: list[Tensor]
    tableau: ButcherTableau
    stepping: Stepping
    coupling: float
    times_out: list[float]
    strategy: str
    extras: dict[str, Any]
    programs: Programs | None = None  # set when compile= asks for compiled fixed-step loops
    compile_steps: Programs | None = None  # set for adaptive solves with compile=: compiled steps
    path: Path | None = None
    stats: SolveStats = dataclass_field(default_factory=SolveStats)
    grid: Grid | None = None  # the compiled forward's grid, reused by the compiled backward


def _reversible_step(field: Any, tableau: ButcherTableau, lam: float):
    """The coupled step ``(Y_n, Z_n) -> (Y_{n+1}, Z_{n+1})`` for the stepping loop.

    Its error estimate is the base method's embedded estimate of the ``Psi_h(t_n, Z_n)``
    step, the one that advances the solution ``Y``.
    """

    def step(t: Tensor, state: tuple[Tensor, Tensor], h: float, carry: Any):
        y, z = state
        psi_forward, error = rk_increment(field, t, z, h, tableau)
        y_next = torch.add(torch.add(psi_forward, y, alpha=lam), z, alpha=1.0 - lam)
        psi_backward, _ = rk_increment(field, t + h, y_next, -h, tableau)
        return (y_next, z - psi_backward), error, None

    return step


def _forward(problem: _Problem, y0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The coupled recursion without a graph; returns ``ys``, ``Y_N`` and ``Z_N``."""
    if problem.programs is not None:
        compiled = _forward_compiled(problem, y0)
        if compiled is not None:
            return compiled
    tableau, stepping = problem.tableau, problem.stepping
    counted = CountedField(problem.field)
    t_like = y0.new_tensor(problem.times_out[0])
    first_step = hairer_first_step(counted, t_like, y0, tableau, stepping)
    step = _reversible_step(counted, tableau, problem.coupling)
    if problem.compile_steps is not None:  # adaptive with compile=: the same step, compiled
        lam = problem.coupling
        step = adaptive_step(problem.compile_steps, "reversible/adaptive_step", problem.field,
                             lambda f: _reversible_step(f, tableau, lam), counted,
                             lambda _: 2 * tableau.stages, (tableau.name, lam))
    outputs, path, stats = integrate(
        step, (y0, y0), lambda s: s[0],
        problem.times_out, t_like, stepping, tableau.order, first_step=first_step,
    )
    ys = torch.stack(outputs)  # (len(ts), batch, *state)
    check_finite_outputs(ys, problem.times_out, problem.field)
    stats.nfe_forward = counted.nfe
    y_last, z_last = path.final_state
    path.final_state = None
    problem.path, problem.stats = path, stats
    return ys, y_last, z_last


IncrementVJP = Callable[[Tensor, Tensor, Any, Tensor], "tuple[Tensor, Tensor, Sequence[Tensor | None]]"]


def _reverse_step(
    increment_vjp: IncrementVJP, lam: float, t: Tensor, h: Any, y: Tensor, z: Tensor, ybar: Tensor, zbar: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Sequence[Tensor | None], Sequence[Tensor | None]]:
    """One step of the backward pass, shared by the eager loop and the compiled scan.

    From ``(Y_{n+1}, Z_{n+1})`` and their cotangents, rebuild ``(Y_n, Z_n)`` and pull the
    cotangents back through the step. ``increment_vjp(t, x, h, cot)`` returns
    ``(Psi_h(t, x), cot^T dPsi/dx, cot^T dPsi/dtheta)``: ``torch.autograd.grad`` eagerly,
    ``torch.func.vjp`` compiled. Returns ``(Y_n, Z_n, ybar_n, zbar_n, thetabar_minus, thetabar_plus)``:
    the parameter cotangent of this step is ``thetabar_plus - thetabar_minus``.
    """
    # Z_{n+1} = Z_n - Psi_{-h}(t_{n+1}, Y_{n+1}): rebuild Z_n and take the VJP at Y_{n+1}.
    psi_backward, ybar_psi, pbars_minus = increment_vjp(t + h, y, -h, zbar)
    z_prev = z + psi_backward
    ybar_total = ybar - ybar_psi
    # Y_{n+1} = lam Y_n + (1 - lam) Z_n + Psi_h(t_n, Z_n): rebuild Y_n and take the VJP at Z_n.
    psi_forward, zbar_psi, pbars_plus = increment_vjp(t, z_prev, h, ybar_total)
    y_prev = (y - (1.0 - lam) * z_prev - psi_forward) / lam
    zbar = zbar + (1.0 - lam) * ybar_total + zbar_psi
    return y_prev, z_prev, lam * ybar_total, zbar, pbars_minus, pbars_plus


def _backward(
    problem: _Problem, y0: Tensor, y_last: Tensor, z_last: Tensor, grad_ys: Tensor
) -> list[Tensor | None]:
    """Rebuild each step from the next and backpropagate through it; ``[ybar_0, *thetabar]``."""
    if problem.programs is not None and problem.grid is not None:
        compiled = _backward_compiled(problem, y0, y_last, z_last, grad_ys)
        if compiled is not None:
            return compiled
    tableau, lam, params, path = problem.tableau, problem.coupling, problem.params, problem.path
    assert path is not None
    output_at: dict[int, list[int]] = {}
    for j, n in enumerate(path.output_steps):
        output_at.setdefault(n, []).append(j)
    param_grads: list[Tensor | None] = [None] * len(params)
    counted = CountedField(problem.field)
    checked = False

    def increment_vjp(t: Tensor, x: Tensor, h: float, cotangent: Tensor):
        nonlocal checked
        leaf = x.detach().requires_grad_()
        with torch.enable_grad():
            psi, _ = rk_increment(counted, t, leaf, h, tableau)
        if not checked:
            check_no_hidden_inputs(psi, [leaf, *params], problem.strategy)
            checked = True
        xbar, *pbars = torch.autograd.grad(psi, [leaf, *params], cotangent, allow_unused=True)
        return psi.detach(), (torch.zeros_like(x) if xbar is None else xbar), pbars

    def accumulate(pbars: Sequence[Tensor | None], sign: float) -> None:
        for i, g in enumerate(pbars):
            if g is not None:
                g = g if sign > 0 else -g
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g

    y, z = y_last, z_last
    ybar, zbar = torch.zeros_like(y_last), torch.zeros_like(z_last)
    for j in output_at.get(path.steps, []):
        ybar = ybar + grad_ys[j]
    for n in reversed(range(path.steps)):
        t = y0.new_tensor(path.times[n])
        y, z, ybar, zbar, pbars_minus, pbars_plus = _reverse_step(
            increment_vjp, lam, t, path.sizes[n], y, z, ybar, zbar
        )
        accumulate(pbars_minus, -1.0)
        accumulate(pbars_plus, 1.0)
        for j in output_at.get(n, []):
            ybar = ybar + grad_ys[j]
    problem.stats.nfe_backward += counted.nfe
    _report_reconstruction(problem, y0, y, z)
    return [ybar + zbar, *param_grads]


def _forward_compiled(problem: _Problem, y0: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """The forward recursion as one compiled scan (fixed steps); ``None`` if it fell back to eager."""
    assert problem.programs is not None
    path = fixed_path(problem.times_out, problem.stepping)
    grid = Grid.of(path.times, path.sizes, path.output_steps, y0)
    field, tableau, lam, layout = problem.field, problem.tableau, problem.coupling, grid.layout

    def build() -> Callable[..., Any]:
        def program(field: Any, y0: Tensor, times: Tensor, sizes: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            step = _reversible_step(field, tableau, lam)  # the eager loop's step
            ys, (y_last, z_last), _ = scan_forward(step, (y0, y0), None, lambda s: s[0], times, sizes, layout, index)
            return ys, y_last, z_last

        return program

    key = problem.programs.key("reversible/forward", field, [y0], (tableau.name, lam, grid.layout))
    if problem.programs.first_call(key):
        CountedField(field)(y0.new_tensor(problem.times_out[0]), y0)  # shape check, as the eager loop's
    result = problem.programs.run(key, build, field, y0, grid.times, grid.sizes, grid.output_index)
    if result is None:
        return None
    ys, y_last, z_last = result
    check_finite_outputs(ys, problem.times_out, problem.field)
    stats = SolveStats(nfe_forward=2 * tableau.stages * grid.steps, accepted_steps=grid.steps)
    problem.path, problem.stats, problem.grid = path, stats, grid
    return ys, y_last, z_last


def _backward_compiled(
    problem: _Problem, y0: Tensor, y_last: Tensor, z_last: Tensor, grad_ys: Tensor
) -> list[Tensor | None] | None:
    """The backward pass as one compiled reverse scan; ``None`` if it fell back to eager."""
    assert problem.programs is not None and problem.grid is not None
    grid, tableau, lam, field = problem.grid, problem.tableau, problem.coupling, problem.field
    params = tuple(problem.params)
    names = functional_names(problem.programs, field, params)
    if names is None:
        return None

    def build() -> Callable[..., Any]:
        def program(field, y_last, z_last, grad_rows, times, sizes, slots, *params):
            call = functional_field(field, names)
            def increment_vjp(t: Tensor, x: Tensor, h: Tensor, cotangent: Tensor):
                def increment(x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
                    return rk_increment(lambda tt, yy: call(params, tt, yy), t, x, h, tableau)[0]

                return func_vjp(increment, x, params, cotangent)

            def body(carry, x):
                y, z, ybar, zbar, pbars = carry
                t, h, slot = x
                y, z, ybar, zbar, minus, plus = _reverse_step(increment_vjp, lam, t, h, y, z, ybar, zbar)
                pbars = tuple(p - m + q for p, m, q in zip(pbars, minus, plus))
                return (y, z, ybar + row(grad_rows, slot), zbar, pbars), h.new_zeros(())

            init = (y_last, z_last, row(grad_rows, slots[-1]), torch.zeros_like(z_last),
                    tuple(torch.zeros_like(p) for p in params))
            (y, z, ybar, zbar, pbars), _ = scan(body, _fresh(init), (times, sizes, slots[:-1]), reverse=True)
            return y, z, ybar + zbar, pbars

        return program

    grad_rows = torch.cat([grad_ys, grad_ys.new_zeros((1, *grad_ys.shape[1:]))])  # row len(ts): no output
    key = problem.programs.key("reversible/backward", field, [y_last, grad_rows, *params], (tableau.name, lam, grid.layout))
    result = problem.programs.run(key, build, field, y_last, z_last, grad_rows, grid.times, grid.sizes, grid.slots,
                                  *params)
    if result is None:
        return None
    y, z, y0bar, pbars = result
    problem.stats.nfe_backward += 2 * tableau.stages * grid.steps
    _report_reconstruction(problem, y0, y, z)
    return [y0bar, *pbars]


#: the relative distance between Y_N and Z_N above which the forward solve is called unstable.
DRIFT_THRESHOLD = 0.1


def _check_coupled_drift(problem: _Problem, y0: Tensor, y_last: Tensor, z_last: Tensor) -> None:
    """Warn when the coupled states ``Y`` and ``Z`` have drifted apart: the solve is unstable.

    Both approximate the same solution, so a stable solve keeps them within its discretisation
    error of each other; an unstable one (a step size outside the reversible scheme's stability
    region) lets them separate exponentially. A free check, in every forward pass, also without
    a backward (validation, test, predict): ``reversible/drift`` in ``Solution.extras``.
    """
    scale = max(float(y0.abs().max()), float(y_last.abs().max()), 1e-300)
    drift = float((y_last - z_last).abs().max()) / scale
    problem.extras["drift"] = drift
    if not math.isfinite(drift) or drift > DRIFT_THRESHOLD:
        sizes = problem.path.sizes if problem.path is not None else []
        h = max((abs(x) for x in sizes), default=float("nan"))
        warnings.warn(
            f"the reversible solve is unstable: its coupled states Y and Z drifted apart by {drift:.3g} "
            f"(relative, > {DRIFT_THRESHOLD}) by t={problem.times_out[-1]:.6g}, so its solution and gradient "
            f"are wrong. The step size (largest {h:.3g}) is outside the reversible scheme's stability "
            f"region for these dynamics: take smaller steps (or adaptive ones), or lower the coupling "
            f"(now {problem.coupling}) to widen the region",
            RuntimeWarning,
            stacklevel=4,
        )


def _report_reconstruction(problem: _Problem, y0: Tensor, y: Tensor, z: Tensor) -> None:
    """Compare the rebuilt ``(Y_0, Z_0)`` with the true ``y0``: a free check of the backward."""
    scale = max(float(y0.abs().max()), 1.0)
    error = max(float((y - y0).abs().max()), float((z - y0).abs().max())) / scale
    problem.extras["reconstruction_error"] = error
    threshold = math.sqrt(torch.finfo(y0.dtype).eps)
    if not math.isfinite(error) or error > threshold:
        warnings.warn(
            f"the reversible backward pass rebuilt y0 with relative error {error:.3g} (> {threshold:.1g}), "
            f"so its gradient is inexact: raise coupling towards 1 (now {problem.coupling}), take "
            f"smaller steps, or solve in float64. A non-deterministic field (dropout in training mode, "
            f"noise drawn inside the field) also breaks the rebuild",
            RuntimeWarning,
            stacklevel=2,
        )


class _ReversibleAdjoint(torch.autograd.Function):
    """``ys = solve(y0; params)``; the parameters are explicit inputs (so DDP's reducer hooks fire)."""

    @staticmethod
    def forward(ctx: Any, problem: _Problem, y0: Tensor, *params: Tensor) -> Tensor:
        # The identity hooks shadow an outer SavedBytes while the field runs (a CNF field
        # builds and frees a graph of its own), so what is counted is what is kept below.
        with torch.autocast(y0.device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(_detached, _identity):
            ys, y_last, z_last = _forward(problem, y0)
            _check_coupled_drift(problem, y0, y_last, z_last)
        ctx.problem = problem
        ctx.save_for_backward(y0, y_last, z_last)  # O(1) in the number of steps
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[Tensor | None, ...]:
        y0, y_last, z_last = ctx.saved_tensors
        with torch.autocast(y0.device.type, enabled=False):
            grads = _backward(ctx.problem, y0, y_last, z_last, grad_ys)
        return (None, *grads)


class Reversible(ODEStrategy):
    """McCallum & Foster's algebraically reversible solver around any explicit RK method.

    Gradient: exact for the reversible discretisation (up to round-off in the rebuild),
    fixed or adaptive steps, losses on any output times. Memory: ``y0``, ``Y_N``, ``Z_N``
    and one step's graph during backward: flat in the number of steps. Cost: ``2 s``
    evaluations per step forward (each step advances ``Y`` and ``Z``), ``2 s`` evaluations
    and two VJPs per step backward.

    Args:
        solver, steps / step_size, rtol / atol / max_steps: as :class:`ODEStrategy`.
        coupling: ``lam`` in ``(0, 1]``. Smaller values widen the forward stability region
            (the scheme is then stable for stiffer, more dissipative fields) but make the
            backward rebuild divide by ``lam``, amplifying round-off; 0.999 (the authors'
            default) keeps both. ``coupling=1`` decouples ``Y`` from ``Z`` (the scheme is then
            the base method on ``Y`` and not stable on the real axis; see docs/reversible.md).

    Not for: states below float32 (bf16/fp16 rebuild the wrong trajectory; refused);
    non-deterministic fields (dropout, noise inside the field must be fixed per solve).
    """

    name = "reversible"
    kinds = frozenset({"ode", "sde"})
    compilable = True

    def __init__(
        self,
        solver: str | ButcherTableau = "dopri5",
        *,
        steps: int | None = None,
        step_size: float | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        coupling: float = 0.999,
        compile: bool | str = False,
    ) -> None:
        super().__init__(solver, steps=steps, step_size=step_size, rtol=rtol, atol=atol, max_steps=max_steps,
                         compile=compile)
        if not (0.0 < float(coupling) <= 1.0):
            raise ValueError(
                f"coupling must be in (0, 1], got {coupling!r}: 1 is the plain base method on Y, values "
                f"near 1 (default 0.999) keep the backward rebuild stable"
            )
        self.coupling = float(coupling)

    def solve(self, field: Any, y0: Tensor, ts: Tensor, *, params: Sequence[Tensor] | None = None) -> Solution:
        if y0.is_floating_point() and torch.finfo(y0.dtype).bits < 32:
            raise TypeError(
                f"the reversible strategy needs a state of at least float32, got {y0.dtype}: in "
                f"half precision the algebraic inverse rebuilds the wrong trajectory. Keep the ODE "
                f"state in float32/float64 (trainer.precision=32-true, or cast y0) and let only the "
                f"field's layers use lower precision"
            )
        times = check_inputs(y0, ts)
        params = inspect_field(field, ts[0], y0, self.name, params=params)
        extras: dict[str, Any] = {}
        problem = _Problem(field, params, self.tableau, self.stepping, self.coupling, times, self.name, extras,
                           programs=self.programs if self._compiles() else None,
                           compile_steps=self.programs if self.compile.enabled and self.stepping.adaptive else None)
        with SavedBytes() as saved:
            ys = _ReversibleAdjoint.apply(problem, y0, *params)
        return self._record(Solution(ys, ts, problem.stats, problem.path, saved_bytes=saved.nbytes, extras=extras))

    def solve_sde(self, sde: Any, y0: Tensor, ts: Tensor, bm: Any, dt: float | None = None) -> Solution:
        """An SDE by reversible Heun with torchsde's exact ``adjoint_reversible_heun`` backward
        (Kidger et al. 2021; see :mod:`nde_zoo.strategies.sde`); the solver and coupling apply to ODEs only."""
        return solve_sde(self, sde, y0, ts, bm, route="reversible", dt=dt)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        errors = [s.extras["reconstruction_error"] for s in self._solutions if "reconstruction_error" in s.extras]
        if errors:
            pl_module.log("reversible/reconstruction_error", max(errors), on_step=True, on_epoch=False, batch_size=1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def __repr__(self) -> str:
        extra = f", compile={self.compile}" if self.compile.enabled else ""
        return f"Reversible(solver={self.tableau.name!r}, {self.stepping.describe()}, coupling={self.coupling}{extra})"
