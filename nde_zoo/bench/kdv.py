"""Korteweg-de Vries data for the symplectic-adjoint benchmark, from a pseudo-spectral solver.

The equation, in Zabusky and Kruskal's form, on the periodic domain ``x in [0, 2 pi)``:

    u_t + u u_x + delta^2 u_xxx = 0

Solved in float64 on a fine grid by Fourier differentiation with the 2/3 dealiasing rule
and the integrating-factor fourth-order Runge-Kutta scheme (Trefethen, *Spectral Methods
in MATLAB*, program 27): the stiff dispersive term ``delta^2 u_xxx`` is integrated exactly
in Fourier space, the nonlinear term ``-(u^2 / 2)_x`` by RK4. The trajectories are then
sampled on a coarse grid (every ``fine // grid``-th point), which is what a Neural ODE
learns. Initial conditions are random low-mode Fourier series (wavenumbers 1 to 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["kdv_solve", "kdv_dataset", "random_initial_conditions"]


def random_initial_conditions(n: int, points: int, *, modes: int = 3, std: float = 0.5,
                              generator: torch.Generator | None = None) -> Tensor:
    """``n`` random zero-mean waves ``sum_k (a_k cos kx + b_k sin kx) / k``, each scaled to ``std``.

    Returns ``(n, points)`` float64 on the grid ``x_j = 2 pi j / points``.
    """
    x = torch.arange(points, dtype=torch.float64) * (2 * math.pi / points)  # (points,)
    coef = torch.randn(n, modes, 2, dtype=torch.float64, generator=generator)  # (n, mode, cos|sin)
    k = torch.arange(1, modes + 1, dtype=torch.float64)  # (modes,)
    waves = (coef[..., 0, None] * torch.cos(k[:, None] * x) + coef[..., 1, None] * torch.sin(k[:, None] * x))
    u0 = (waves / k[:, None]).sum(dim=1)  # (n, points)
    return u0 * (std / u0.std(dim=1, keepdim=True))


def kdv_solve(u0: Tensor, ts: Tensor, *, delta: float, dt: float) -> Tensor:
    """Integrate KdV from ``u0`` ``(batch, points)`` to every time in ``ts`` (from ``ts[0]``).

    Integrating-factor RK4 with a fixed step no larger than ``dt`` (each interval between
    output times is split into equal steps). Returns ``(len(ts), batch, points)`` float64.
    """
    u0 = u0.to(torch.float64)
    points = u0.shape[-1]
    k = torch.fft.rfftfreq(points, d=1.0 / points).to(torch.float64)  # wavenumbers 0..points/2
    dealias = (k < points / 3).to(torch.float64)  # 2/3 rule on the quadratic term
    g = -0.5j * k * dealias  # N(v) = g * fft(u^2): the term -(u^2/2)_x
    linear = 1j * delta**2 * k**3  # -delta^2 u_xxx in Fourier space: +i delta^2 k^3 u_hat

    def nonlinear(v: Tensor) -> Tensor:
        u = torch.fft.irfft(v, n=points)
        return g * torch.fft.rfft(u * u)

    v = torch.fft.rfft(u0)
    out = [u0.clone()]
    times = ts.tolist()
    for t_a, t_b in zip(times[:-1], times[1:]):
        steps = max(1, math.ceil(abs(t_b - t_a) / dt - 1e-9))
        h = (t_b - t_a) / steps
        e = torch.exp(linear * h / 2)
        e2 = e * e
        for _ in range(steps):
            a = h * nonlinear(v)
            b = h * nonlinear(e * (v + a / 2))
            c = h * nonlinear(e * v + b / 2)
            d = h * nonlinear(e2 * v + e * c)
            v = e2 * v + (e2 * a + 2 * e * (b + c) + d) / 6
        out.append(torch.fft.irfft(v, n=points))
    return torch.stack(out)


def kdv_dataset(n: int, *, grid: int = 32, fine: int = 128, delta: float = 0.15, t_end: float = 1.0,
                n_times: int = 11, dt: float = 1e-3, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """``n`` KdV trajectories sampled on a ``grid``-point mesh at ``n_times`` times in ``[0, t_end]``.

    Solved on ``fine`` points with step ``dt`` and, for a self-check, again with ``dt / 2``.

    Returns:
        ``ts`` ``(n_times,)``, ``u`` ``(n_times, n, grid)`` (both float64), and the largest
        difference between the two solves relative to the data's largest value (the data's
        time-discretisation error, about ``16x`` smaller than this difference for RK4).
    """
    if fine % grid:
        raise ValueError(f"fine={fine} must be a multiple of grid={grid}")
    generator = torch.Generator().manual_seed(seed)
    u0 = random_initial_conditions(n, fine, generator=generator)
    ts = torch.linspace(0.0, t_end, n_times, dtype=torch.float64)
    u = kdv_solve(u0, ts, delta=delta, dt=dt)
    u_half = kdv_solve(u0, ts, delta=delta, dt=dt / 2)
    self_check = float((u - u_half).abs().max() / u_half.abs().max())
    stride = fine // grid
    return ts, u[..., ::stride].contiguous(), self_check
