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
from typing import Any

import torch
from torch import Tensor

from nde_zoo.solvers import ButcherTableau, Path, rk_increment
from nde_zoo.strategies.base import ODEStrategy, SavedBytes, Solution, takes_stepping
from nde_zoo.driver.loop import Scheme, add_grads
from nde_zoo.strategies.plan import Cost, ProbeFit
from nde_zoo.strategies.sde import solve_sde

__all__ = ["Reversible", "ReversibleScheme"]


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


class ReversibleScheme(Scheme):
    """The coupled step on ``(Y, Z)``, only the final state kept, rebuilt step by step backwards."""

    keeps = "ends"

    def __init__(self, tableau: ButcherTableau, coupling: float) -> None:
        super().__init__(tableau)
        self.coupling = coupling

    def step(self, field: Any) -> Callable[..., Any]:
        return _reversible_step(field, self.tableau, self.coupling)

    def init(self, y0: Tensor) -> tuple[Tensor, Tensor]:
        return (y0, y0)

    def observe(self, state: tuple[Tensor, Tensor]) -> Tensor:
        return state[0]

    def first_carry(self, field: Any, t0: Tensor, state0: Any) -> None:
        return None

    def step_evaluations(self, carry: Any) -> int:
        return 2 * self.tableau.stages

    def forward_nfe(self, steps: int) -> int:
        return 2 * self.tableau.stages * steps

    def key(self) -> tuple[Any, ...]:
        return (self.tableau.name, self.coupling)

    def reverse(self, ops: Any, t: Tensor, h: Any, t_first: Tensor, state: Any, bar: Any) -> Any:
        tableau = self.tableau

        def increment_vjp(t: Tensor, x: Tensor, h: Any, cotangent: Tensor) -> Any:
            return ops.vjp(lambda f, x: rk_increment(f, t, x, h, tableau)[0], x, cotangent)

        (y, z), (ybar, zbar) = state, bar
        y, z, ybar, zbar, minus, plus = _reverse_step(increment_vjp, self.coupling, t, h, y, z, ybar, zbar)
        return (y, z), (ybar, zbar), add_grads(add_grads([None] * len(plus), plus), minus, -1.0)

    def backward_nfe(self, steps: int) -> int:
        return 2 * self.tableau.stages * steps

    def zero_bar(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.zeros_like(like), torch.zeros_like(like))

    def add_output(self, bar: Any, cotangent: Tensor) -> tuple[Tensor, Tensor]:
        return (bar[0] + cotangent, bar[1])

    def y0_bar(self, bar: Any) -> Tensor:
        return bar[0] + bar[1]  # Y_0 = Z_0 = y0

    def pack(self, state: Any) -> tuple[Tensor, ...]:
        return tuple(state)

    def unpack(self, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return (tensors[0], tensors[1])

    def after_forward(self, y0: Tensor, state: Any, path: Path, extras: dict[str, Any]) -> None:
        _check_coupled_drift(self.coupling, path, extras, y0, *state)

    def after_backward(self, y0: Tensor, state: Any, extras: dict[str, Any]) -> None:
        _report_reconstruction(self.coupling, extras, y0, *state)


#: the relative distance between Y_N and Z_N above which the forward solve is called unstable.
DRIFT_THRESHOLD = 0.1


def _check_coupled_drift(coupling: float, path: Path, extras: dict[str, Any], y0: Tensor, y_last: Tensor,
                         z_last: Tensor) -> None:
    """Warn when the coupled states ``Y`` and ``Z`` have drifted apart: the solve is unstable.

    Both approximate the same solution, so a stable solve keeps them within its discretisation
    error of each other; an unstable one (a step size outside the reversible scheme's stability
    region) lets them separate exponentially. A free check, in every forward pass, also without
    a backward (validation, test, predict): ``reversible/drift`` in ``Solution.extras``.
    """
    scale = max(float(y0.abs().max()), float(y_last.abs().max()), 1e-300)
    drift = float((y_last - z_last).abs().max()) / scale
    extras["drift"] = drift
    if not math.isfinite(drift) or drift > DRIFT_THRESHOLD:
        h = max((abs(x) for x in path.sizes), default=float("nan"))
        warnings.warn(
            f"the reversible solve is unstable: its coupled states Y and Z drifted apart by {drift:.3g} "
            f"(relative, > {DRIFT_THRESHOLD}) by t={path.times[-1]:.6g}, so its solution and gradient "
            f"are wrong. The step size (largest {h:.3g}) is outside the reversible scheme's stability "
            f"region for these dynamics: take smaller steps (or adaptive ones), or lower the coupling "
            f"(now {coupling}) to widen the region",
            RuntimeWarning,
            stacklevel=4,
        )


def _report_reconstruction(coupling: float, extras: dict[str, Any], y0: Tensor, y: Tensor, z: Tensor) -> None:
    """Compare the rebuilt ``(Y_0, Z_0)`` with the true ``y0``: a free check of the backward."""
    scale = max(float(y0.abs().max()), 1.0)
    error = max(float((y - y0).abs().max()), float((z - y0).abs().max())) / scale
    extras["reconstruction_error"] = error
    threshold = math.sqrt(torch.finfo(y0.dtype).eps)
    if not math.isfinite(error) or error > threshold:
        warnings.warn(
            f"the reversible backward pass rebuilt y0 with relative error {error:.3g} (> {threshold:.1g}), "
            f"so its gradient is inexact: raise coupling towards 1 (now {coupling}), take "
            f"smaller steps, or solve in float64. A non-deterministic field (dropout in training mode, "
            f"noise drawn inside the field) also breaks the rebuild",
            RuntimeWarning,
            stacklevel=2,
        )


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
    exact = True

    @classmethod
    def predict(cls, fit: ProbeFit, budget: int, compiled: bool) -> Cost:
        """Flat in ``N``: the coupled state, and an output with its cotangent per output time."""
        return Cost(max(fit.flat("forward_peak"), fit.flat("backward_peak")), fit.seconds(), flat=True)

    @takes_stepping
    def __init__(self, solver: str | ButcherTableau = "dopri5", *, coupling: float = 0.999, **stepping: Any) -> None:
        super().__init__(solver, **stepping)
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
        extras: dict[str, Any] = {}
        with SavedBytes() as saved:
            ys, stats, path = self.drive(ReversibleScheme(self.tableau, self.coupling), field, y0, ts, params,
                                          autocast_off=True, extras=extras)
        return self._record(Solution(ys, ts, stats, path, saved_bytes=saved.nbytes, extras=extras))

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
