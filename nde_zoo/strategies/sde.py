"""Neural SDEs: how the gradient strategies map onto torchsde, and the local error of an SDE step.

The zoo's SDEs are Stratonovich with diagonal noise, ``dy = f(t, y) dt + g(t, y) o dW``
with ``g(t, y)`` of the same shape as ``y`` (elementwise noise): every route below supports
that, reversible Heun included. An SDE is an ``nn.Module`` with ``f(t, y)`` and ``g(t, y)``
(``t`` a 0-d tensor, ``y`` and both outputs ``(batch, d)``), ``noise_type = "diagonal"`` and
``sde_type = "stratonovich"``; its parameters are the only trainable inputs besides ``y0``.

Routes (``GradientStrategy.solve_sde`` delegates here):

- ``direct`` -> ``sdeint``, backprop through the steps: exact for the discretisation, memory O(N).
- ``adjoint`` -> ``sdeint_adjoint``, the stochastic adjoint (Li et al. 2020): approximate (it solves
  the adjoint SDE backwards), memory O(1).
- ``reversible`` -> ``sdeint_adjoint`` with ``reversible_heun`` forward and ``adjoint_reversible_heun``
  backward (Kidger et al. 2021): exact for reversible Heun up to round-off, memory O(1).

``checkpoint``, ``symplectic`` and ``seminorm`` have no SDE form here: they declare
``kinds = {"ode"}`` and a model solving an SDE refuses them by name.

Steps: SDE solves take fixed steps: the strategy's ``steps``/``step_size``, or, for an adaptive
strategy (the default configs), the model's ``dt`` (torchsde's step doubling makes reversible Heun
inexact, and comparisons need one grid). ``direct``/``adjoint`` follow the strategy's solver
(:data:`SDE_METHODS`; a higher-order ODE tableau cannot raise an SDE's strong order, so others run
midpoint); ``reversible`` runs reversible Heun with every output time on its grid (checked). Noise
comes from the model's seeded ``bm``, so the backward pass sees the forward's Brownian sample.

Local error (for ERNODE): :func:`sde_local_error`, torchsde's step-doubling estimate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nde_zoo.solvers import SolveStats, check_finite_outputs, check_inputs
from nde_zoo.solvers.stepping import error_ratio
from nde_zoo.driver.autograd import check_no_hidden_inputs
from nde_zoo.strategies.base import SavedBytes, Solution, field_parameters

__all__ = ["ROUTES", "SDE_METHODS", "sde_method", "sde_step_size", "check_sde", "brownian", "solve_sde",
           "sde_local_error", "midpoint_step"]

ROUTES = ("direct", "adjoint", "reversible")
#: our ODE solver names -> torchsde's Stratonovich method for direct/adjoint; others -> midpoint.
SDE_METHODS = {"euler": "euler_heun", "heun": "heun", "midpoint": "midpoint"}
DEFAULT_SDE_METHOD = "midpoint"


def sde_method(solver_name: str) -> str:
    """The torchsde method ``direct``/``adjoint`` use for a strategy's solver (see the module doc)."""
    return SDE_METHODS.get(solver_name, DEFAULT_SDE_METHOD)


def sde_step_size(strategy: Any, times: list[float], dt: float | None) -> float:
    """The fixed step of an SDE solve: the strategy's when it has one, else the model's ``dt``."""
    span = abs(times[-1] - times[0])
    stepping = strategy.stepping
    if stepping.steps is not None:
        return span / stepping.steps
    if stepping.step_size is not None:
        return float(stepping.step_size)
    if dt is None or not dt > 0:
        raise ValueError(
            f"strategy {strategy.name!r} is adaptive (rtol/atol), which SDE solves do not use: pass the "
            "model's step dt > 0, or give the strategy fixed steps (strategy.steps=N or strategy.step_size=h)"
        )
    return float(dt)


def check_sde(sde: Any, y0: Tensor, t0: Tensor) -> None:
    """Check the SDE's interface and its output shapes once, explaining each dimension."""
    if not (isinstance(sde, nn.Module) and callable(getattr(sde, "f", None)) and callable(getattr(sde, "g", None))):
        raise TypeError(f"an SDE must be an nn.Module with methods f(t, y) and g(t, y); got {type(sde).__name__}")
    if getattr(sde, "noise_type", None) != "diagonal" or getattr(sde, "sde_type", None) != "stratonovich":
        raise ValueError(
            "the zoo's SDE routes need noise_type='diagonal' and sde_type='stratonovich' (reversible Heun "
            f"is Stratonovich); {type(sde).__name__} has noise_type={getattr(sde, 'noise_type', None)!r}, "
            f"sde_type={getattr(sde, 'sde_type', None)!r}"
        )
    if y0.dim() != 2:
        raise ValueError(f"y0 must have shape (batch, state), got {tuple(y0.shape)}")
    with torch.no_grad():
        for name in ("f", "g"):
            out = getattr(sde, name)(t0, y0)
            if out.shape != y0.shape or out.dtype != y0.dtype:
                what = "drift" if name == "f" else "diagonal diffusion (one noise channel per state channel)"
                raise ValueError(
                    f"{type(sde).__name__}.{name} (the {what}) returned shape {tuple(out.shape)} and dtype "
                    f"{out.dtype}, whilst y0 has shape {tuple(y0.shape)} (meaning batch {y0.shape[0]}, state "
                    f"{y0.shape[1]}) and dtype {y0.dtype}; they must match"
                )


def _torchsde() -> Any:
    """torchsde, imported when an SDE is solved (it is the optional ``[sde]`` extra)."""
    try:
        import torchsde
    except ImportError as exc:  # pragma: no cover - the dev environment has it
        raise ImportError("solving SDEs needs torchsde: pip install 'nde-zoo[sde]'") from exc
    return torchsde


def brownian(t0: float, t1: float, like: Tensor, entropy: int, dt: float | None = None) -> Any:
    """A seeded Brownian sample on ``[t0, t1]`` with one channel per entry of ``like`` ``(batch, d)``.

    The same ``entropy`` gives the same sample (whatever order it is queried in), so the
    backward pass and a test can replay it.
    """
    return _torchsde().BrownianInterval(t0=t0, t1=t1, size=tuple(like.shape), dtype=like.dtype, device=like.device,
                                        entropy=int(entropy), dt=dt, levy_area_approximation="none")


class _CountedSDE(nn.Module):
    """Holds the user's SDE as a submodule and counts drift evaluations (one ``f`` = one NFE).

    Calls during the forward solve go to ``nfe_forward``; after it returns, to ``nfe_backward``.
    """

    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, sde: nn.Module, stats: SolveStats) -> None:
        super().__init__()
        self.sde = sde
        self.stats = stats
        self.forward_done = False

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        if self.forward_done:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        return self.sde.f(t, y)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        return self.sde.g(t, y)


def _check_grid(ts: Tensor, dt: float, strategy: str) -> None:
    """Refuse output times that torchsde's stepping would pass by a whole step.

    torchsde steps ``t += dt`` (in ``ts``'s dtype, clamped to ``ts[-1]``) and interpolates the
    outputs; its reversible-Heun backward steps to each output time exactly. When round-off
    leaves ``t`` just short of an output time the forward takes one more step and the two
    grids differ by a step from there on. This replays the forward's float sums.
    """
    dtype = np.float32 if ts.dtype == torch.float32 else np.float64
    times = ts.detach().cpu().numpy().astype(dtype)
    step, t = dtype(dt), times[0]
    for out in times[1:-1]:
        while t < out:
            t = min(t + step, times[-1])
        if float(t - out) > 1e-6 * dt:
            raise ValueError(
                f"strategy {strategy!r} runs reversible Heun, whose gradient is exact only when every output "
                f"time is on its step grid; with dt={dt:.6g} from {float(times[0])} the steps pass output "
                f"time {float(out)} at {float(t)}. Choose dt (or strategy.steps) so that the output times "
                "are whole steps apart, e.g. a power-of-two fraction of their spacing"
            )


def _check_hidden(sde: nn.Module, y0: Tensor, t0: Tensor, params: list[Tensor], strategy: str) -> None:
    """torchsde's adjoints differentiate only ``y0`` and ``adjoint_params``: refuse any other input."""
    y_leaf = y0.detach().requires_grad_()
    with torch.enable_grad():
        out = sde.f(t0, y_leaf) + sde.g(t0, y_leaf)
    check_no_hidden_inputs(out, [y_leaf, *params], strategy)


def solve_sde(
    strategy: Any, sde: nn.Module, y0: Tensor, ts: Tensor, bm: Any, *, route: str, dt: float | None = None
) -> Solution:
    """Solve the SDE from ``y0`` at ``ts[0]`` with outputs at every ``ts``, along ``route``.

    Args:
        strategy: the calling strategy (its ``name``, ``tableau``, ``stepping``; the solution is
            recorded on it for its per-step figures).
        sde: the SDE module (see the module docstring).
        y0: ``(batch, d)``; ts: 1-D increasing output times.
        bm: the Brownian sample (e.g. :func:`brownian`), covering ``[ts[0], ts[-1]]``.
        route: ``"direct"``, ``"adjoint"`` or ``"reversible"``.
        dt: the step used when the strategy is adaptive (see the module docstring).

    Returns:
        A :class:`Solution` with ``ys`` of shape ``(len(ts), batch, d)``; ``extras["sde"]`` holds
        the method and step used.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    times = check_inputs(y0, ts)
    if times[-1] < times[0]:
        raise ValueError("SDE output times must increase (torchsde integrates forwards)")
    check_sde(sde, y0, ts[0])
    step = sde_step_size(strategy, times, dt)
    method = "reversible_heun" if route == "reversible" else sde_method(strategy.tableau.name)
    if route == "reversible":
        _check_grid(ts, step, strategy.name)
    stats = SolveStats()
    counted = _CountedSDE(sde, stats)
    params = field_parameters(sde)
    differentiate = torch.is_grad_enabled() and (y0.requires_grad or any(p.requires_grad for p in params))
    torchsde = _torchsde()
    with SavedBytes() as saved:
        if route == "direct" or not differentiate:
            ys = torchsde.sdeint(counted, y0, ts, bm=bm, method=method, dt=step)
        else:
            _check_hidden(sde, y0, ts[0], params, strategy.name)
            adjoint_method = "adjoint_reversible_heun" if route == "reversible" else method
            ys = torchsde.sdeint_adjoint(counted, y0, ts, bm=bm, method=method, adjoint_method=adjoint_method,
                                         dt=step, adjoint_params=tuple(params))
    counted.forward_done = True
    check_finite_outputs(ys, times)
    stats.accepted_steps = int(math.ceil((times[-1] - times[0]) / step - 1e-9))
    extras = {"sde": {"method": method, "dt": step, "route": route}}
    return strategy._record(Solution(ys, ts, stats, None, saved_bytes=saved.nbytes, extras=extras))


def midpoint_step(sde: nn.Module, t: Tensor, y: Tensor, h: float, dw: Tensor) -> Tensor:
    """One Stratonovich midpoint step ``y -> y + f(t+h/2, y_m) h + g(t+h/2, y_m) dW``, diagonal noise."""
    y_mid = y + 0.5 * (sde.f(t, y) * h + sde.g(t, y) * dw)
    t_mid = t + 0.5 * h
    return y + sde.f(t_mid, y_mid) * h + sde.g(t_mid, y_mid) * dw


def sde_local_error(
    sde: nn.Module, t: Tensor, y: Tensor, h: float, bm: Any, rtol: float, atol: float
) -> Tensor:
    """The scaled step-doubling error of one SDE step of size ``h > 0`` from ``(t, y)``.

    One Stratonovich midpoint step of ``h`` against two of ``h/2`` driven by the same Brownian
    increments (``W(t, t+h) = W(t, t+h/2) + W(t+h/2, t+h)``), the estimate torchsde's adaptive
    stepping uses; returns the RMS over batch and state of ``error / (atol + rtol max(|y|, |y_two|))``
    (0-d, differentiable through ``sde``'s parameters and ``y``). Six drift and six diffusion evaluations.
    """
    if not h > 0:
        raise ValueError(f"the SDE local error needs a positive step, got h={h}")
    t0 = float(t)
    dw1 = bm(t0, t0 + 0.5 * h)
    dw2 = bm(t0 + 0.5 * h, t0 + h)
    one = midpoint_step(sde, t, y, h, dw1 + dw2)
    half = midpoint_step(sde, t, y, 0.5 * h, dw1)
    two = midpoint_step(sde, t + 0.5 * h, half, 0.5 * h, dw2)
    return error_ratio(one - two, y, two, rtol, atol)  # the ODE solvers' ratio; zero-safe gradient


# -- LocalERNODE on SDEs ---------------------------------------------------------------------------
def _grid_time(times: list[float], step: float, k: int, dtype: torch.dtype) -> float:
    """The start of step ``k`` exactly as torchsde's loop reaches it (repeated sums in ``dtype``)."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    t, h, end = np_dtype(times[0]), np_dtype(step), np_dtype(times[-1])
    for _ in range(k):
        t = min(t + h, end)
    return float(t)


def ernode_solve_sde(ernode: Any, sde: nn.Module, y0: Tensor, ts: Tensor, bm: Any, dt: float | None) -> Solution:
    """Local ERNODE (Pal et al. 2023) around an SDE solve: the inner strategy solves, one step is sampled.

    SDE solves take fixed steps, so ``t_reg`` is the start of a step drawn uniformly from the
    grid (both ``sampling`` modes: on a fixed grid the accepted step times *are* the grid). The
    inner strategy solves with ``t_reg`` added to the output times (it is on the grid, so
    reversible Heun stays exact); the state there, the step ``h`` and the Brownian sample are
    kept for :func:`ernode_sde_regularisation`. Without gradients (inference) nothing is sampled.
    """
    inner = ernode.inner
    if not torch.is_grad_enabled() or ts.numel() < 2:
        return inner.solve_sde(sde, y0, ts, bm, dt=dt)
    times = check_inputs(y0, ts)
    step = sde_step_size(inner, times, dt)
    n_steps = max(1, int(math.ceil((times[-1] - times[0]) / step - 1e-9)))
    k = min(int(ernode.rng.random() * n_steps), n_steps - 1)
    t_reg = _grid_time(times, step, k, ts.dtype)
    h = min(step, times[-1] - t_reg)
    if t_reg in times:
        index, ts_aug = times.index(t_reg), ts
    else:
        index = sum(1 for t in times if t < t_reg)
        ts_aug = torch.cat([ts[:index], ts.new_tensor([t_reg]), ts[index:]])
    solution = inner.solve_sde(sde, y0, ts_aug, bm, dt=dt)
    ys = solution.ys if ts_aug is ts else torch.cat([solution.ys[:index], solution.ys[index + 1 :]])
    extras = dict(solution.extras)
    extras["ernode_sde"] = {"sde": sde, "t": ts_aug[index], "y": solution.ys[index], "h": h, "bm": bm}
    return Solution(ys, ts, solution.stats, solution.path, solution.saved_bytes, extras)


def ernode_sde_regularisation(ernode: Any, solution: Solution) -> Tensor:
    """``coef * err * h`` with ``err`` the step-doubling local error (:func:`sde_local_error`) at ``t_reg``."""
    sample = solution.extras["ernode_sde"]
    rtol, atol = ernode._tolerances()
    err = sde_local_error(sample["sde"], sample["t"], sample["y"], sample["h"], sample["bm"], rtol, atol)
    value = ernode.coef * err * sample["h"]
    ernode._note_value(value)
    return value
