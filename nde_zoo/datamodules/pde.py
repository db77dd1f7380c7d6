"""Fields on a periodic grid for the ``pde`` model, from a finer pseudo-spectral reference solver.

Four systems, each solved in float64 by Fourier differentiation (``torch.fft``) with the
integrating-factor fourth-order Runge-Kutta scheme (Lawson's RK4; Trefethen, *Spectral Methods in
MATLAB*, program 27): the stiff linear part (diffusion, dispersion) is integrated exactly in Fourier
space, the nonlinear terms by RK4, so the time error is of order 4 (``reference_order`` measures it).

* ``burgers`` (1-D, one channel) on ``x in [0, 2 pi)``: ``u_t + u u_x = nu u_xx``, the quadratic
  term dealiased by the 2/3 rule. Initial conditions: random zero-mean Fourier series of wavenumbers
  1 to ``modes`` with amplitudes falling as ``1/k``, scaled to standard deviation ``amplitude``.
* ``kdv`` (1-D, one channel) on ``x in [0, 2 pi)``: Korteweg-de Vries in Zabusky and Kruskal's form,
  ``u_t + u u_x + delta^2 u_xxx = nu u_xx`` (``dispersion = delta^2``, ``nu`` the diffusion, 0 by
  default): dispersive and conservative, its solitons travel and collide without decaying, so the
  state at a late time depends on the whole history. Initial conditions as Burgers'.
* ``zk`` (2-D, one channel) on ``[0, 2 pi)^2``: Zakharov-Kuznetsov, KdV in two dimensions,
  ``u_t + u u_x + delta^2 (u_xx + u_yy)_x = nu lap u`` (``x`` the last axis): as conservative and
  dispersive as KdV, on a grid whose states are 64 times larger at 64 points a side, so backprop
  through a rollout runs out of memory long before KdV's does. Initial conditions: random plane waves
  of wavenumbers ``|k_x|, |k_y| <= modes`` with amplitudes falling as ``1/|k|``, scaled to standard
  deviation ``amplitude``.
* ``gray_scott`` (2-D, two channels ``u, v``) on ``[0, L)^2``:
  ``u_t = D_u lap u - u v^2 + F (1 - u)``, ``v_t = D_v lap v + u v^2 - (F + k) v``. Initial
  conditions: ``u = 1, v = 0`` with ``patches`` random square patches (side a fifth of the domain) where ``u = 1/2, v = 1/4`` (Pearson
  1993), their edges smoothed by half a time unit of heat flow so the field is resolved on the coarse grid.

Every trajectory is solved on a grid ``refine`` times finer than the one the model sees, then
sampled at every ``refine``-th point, at ``n_obs + 1`` equally spaced times ``k * obs_dt``.
Splits come from their own seeds (``seed``, ``seed + 1``, ``seed + 2``), so the data are
deterministic under ``seed``; the generated tensors are cached on disk under a name that hashes
every argument that shapes them (``cache_dir``; ``None``: ``$XDG_CACHE_HOME/nde_zoo/pde`` or
``~/.cache/nde_zoo/pde``; ``"off"``: no cache).

Training serves windows of ``train_window`` observation intervals cut from the training
trajectories (every start, stride ``window_stride``); validation and test serve whole
trajectories, so their error is over a horizon ``n_obs / train_window`` times the training one.
A batch is ``(t, u)``: ``t`` ``(batch, K)`` times from 0 and ``u`` ``(batch, K, C, *grid)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from nde_zoo.datamodules.base import SplitDataModule

__all__ = ["PDEDataModule", "SYSTEMS", "spectral_solve", "burgers_problem", "kdv_problem", "zk_problem",
           "gray_scott_problem", "reference_order", "WindowDataset"]

SYSTEMS = ("burgers", "kdv", "zk", "gray_scott")
#: the known part each system's ``model=pde`` learns a correction to (``known`` of the model)
KNOWN_PART = {"burgers": "diffusion", "kdv": "dispersion", "zk": "dispersion", "gray_scott": "diffusion"}
#: the systems with a dispersion term (KdV's ``u_xxx``, Zakharov-Kuznetsov's ``(u_xx + u_yy)_x``)
DISPERSIVE = ("kdv", "zk")
Problem = tuple[Tensor, Callable[[Tensor], Tensor], int]  # (linear symbol, nonlinear term, spatial dims)


def _wavenumbers(points: int, length: float, dims: int) -> list[Tensor]:
    """Angular wavenumbers of an ``rfftn`` over the last ``dims`` axes, broadcastable."""
    out = []
    for axis in range(dims):
        last = axis == dims - 1
        k = (torch.fft.rfftfreq(points, d=length / points) if last else torch.fft.fftfreq(points, d=length / points))
        k = (2 * math.pi * k).to(torch.float64)
        shape = [1] * dims
        shape[axis] = -1
        out.append(k.reshape(shape))
    return out


def _dealias(points: int, length: float, dims: int) -> Tensor:
    """The 2/3 rule: 1 where every ``|k_i|`` is below a third of the grid's wavenumbers."""
    cut = (2 * math.pi / length) * points / 3
    mask = torch.ones(())
    for k in _wavenumbers(points, length, dims):
        mask = mask * (k.abs() < cut)
    return mask.to(torch.float64)


def burgers_problem(points: int, nu: float, length: float = 2 * math.pi) -> Problem:
    """Viscous Burgers ``u_t = nu u_xx - (u^2 / 2)_x`` on ``points`` points of ``[0, length)``."""
    (k,) = _wavenumbers(points, length, 1)
    linear = (-nu * k**2).unsqueeze(0)  # (C=1, freq)
    g = -0.5j * k * _dealias(points, length, 1)

    def nonlinear(v: Tensor) -> Tensor:
        u = torch.fft.irfft(v, n=points)
        return g * torch.fft.rfft(u * u)

    return linear, nonlinear, 1


def kdv_problem(points: int, dispersion: float, nu: float = 0.0, length: float = 2 * math.pi) -> Problem:
    """Korteweg-de Vries ``u_t = -(u^2 / 2)_x - dispersion u_xxx + nu u_xx`` on ``points`` points of
    ``[0, length)``: the dispersive term (``+i dispersion k^3`` in Fourier space) is in the linear part,
    integrated exactly; the quadratic term dealiased by the 2/3 rule."""
    return _dispersive_problem(points, dispersion, nu, length, dims=1)


def zk_problem(points: int, dispersion: float, nu: float = 0.0, length: float = 2 * math.pi) -> Problem:
    """Zakharov-Kuznetsov, KdV in two dimensions: ``u_t = -(u^2 / 2)_x - dispersion (u_xx + u_yy)_x +
    nu lap u`` on ``points^2`` points of ``[0, length)^2``, ``x`` the last axis. The dispersive term
    (``+i dispersion k_x |k|^2`` in Fourier space) is in the linear part, integrated exactly; the
    quadratic term dealiased by the 2/3 rule. Conservative for ``nu = 0``: solitary waves travel along
    ``x`` and keep their energy, as KdV's do."""
    return _dispersive_problem(points, dispersion, nu, length, dims=2)


def _dispersive_problem(points: int, dispersion: float, nu: float, length: float, dims: int) -> Problem:
    """``u_t = -(u^2 / 2)_x - dispersion (lap u)_x + nu lap u`` in ``dims`` dimensions, ``x`` the last
    axis: KdV in 1-D, Zakharov-Kuznetsov in 2-D."""
    *_, kx = k = _wavenumbers(points, length, dims)  # x is the last (rfft) axis
    k2 = sum(ki**2 for ki in k)
    linear = (-nu * k2 + 1j * dispersion * (kx * k2)).unsqueeze(0)  # (C=1, *freq), complex
    g = -0.5j * kx * _dealias(points, length, dims)
    axes, shape = tuple(range(-dims, 0)), (points,) * dims

    def nonlinear(v: Tensor) -> Tensor:
        u = torch.fft.irfftn(v, s=shape, dim=axes)
        return g * torch.fft.rfftn(u * u, dim=axes)

    return linear, nonlinear, dims


def gray_scott_problem(points: int, du: float, dv: float, feed: float, kill: float, length: float) -> Problem:
    """Gray-Scott reaction-diffusion (channels ``u, v``) on ``points^2`` points of ``[0, length)^2``."""
    kx, ky = _wavenumbers(points, length, 2)
    lap = -(kx**2 + ky**2)
    linear = torch.stack([du * lap, dv * lap])  # (C=2, fx, fy)
    mask = _dealias(points, length, 2)

    def nonlinear(w: Tensor) -> Tensor:
        u, v = torch.fft.irfftn(w, s=(points, points), dim=(-2, -1)).unbind(-3)
        uvv = u * v * v
        reaction = torch.stack([-uvv + feed * (1 - u), uvv - (feed + kill) * v], dim=-3)
        return mask * torch.fft.rfftn(reaction, dim=(-2, -1))

    return linear, nonlinear, 2


def spectral_solve(u0: Tensor, ts: list[float], problem: Problem, dt: float) -> Tensor:
    """Integrating-factor RK4 from ``u0`` ``(batch, C, *grid)`` to every time of ``ts`` (from ``ts[0]``).

    Each interval between output times is split into equal steps no longer than ``dt``. Returns
    ``(batch, len(ts), C, *grid)`` float64.
    """
    linear, nonlinear, dims = problem
    axes = tuple(range(-dims, 0))
    shape = u0.shape[-dims:]
    v = torch.fft.rfftn(u0.to(torch.float64), dim=axes)
    out = [u0.to(torch.float64)]
    cache: dict[float, tuple[Tensor, Tensor]] = {}
    for t_a, t_b in zip(ts[:-1], ts[1:], strict=True):
        steps = max(1, math.ceil(abs(t_b - t_a) / dt - 1e-9))
        h = (t_b - t_a) / steps
        if h not in cache:
            cache[h] = (torch.exp(linear * h), torch.exp(linear * h / 2))
        e, e2 = cache[h]
        for _ in range(steps):
            a = nonlinear(v)
            b = nonlinear(e2 * (v + 0.5 * h * a))
            c = nonlinear(e2 * v + 0.5 * h * b)
            d = nonlinear(e * v + h * e2 * c)
            v = e * v + (h / 6) * (e * a + 2 * e2 * (b + c) + d)
        out.append(torch.fft.irfftn(v, s=shape, dim=axes))
    return torch.stack(out, dim=1)


def reference_order(system: str = "burgers", t1: float | None = None, dt: float | None = None,
                    **kwargs: Any) -> float:
    """The observed order of the reference solver in time on ``[0, t1]`` (default: one observation
    interval): ``log2`` of the error ratio of steps ``dt`` (default: the generator's ``solver_dt``)
    and ``dt / 2`` against a solve with ``dt / 32``, on the fine grid, one random initial condition."""
    data = PDEDataModule(system=system, n_train=1, n_val=1, n_test=1, cache_dir="off", **kwargs)
    t1 = data.obs_dt if t1 is None else t1
    dt = data.solver_dt if dt is None else dt
    u0 = data.initial_conditions(1, torch.Generator().manual_seed(0), fine=True)
    problem = data.problem(fine=True)
    solve = [spectral_solve(u0, [0.0, t1], problem, h)[:, -1] for h in (dt, dt / 2, dt / 32)]
    coarse, half = ((s - solve[2]).abs().max().item() for s in solve[:2])
    return math.log2(coarse / half)


class WindowDataset(Dataset):
    """Every window of ``window + 1`` consecutive observations (start stride ``stride``) of trajectories
    ``u`` ``(n, T + 1, C, *grid)``; an item is ``(t, u)``, its times from 0."""

    def __init__(self, t: Tensor, u: Tensor, window: int, stride: int = 1) -> None:
        if not 1 <= window <= u.shape[1] - 1:
            raise ValueError(f"train_window={window} must be between 1 and n_obs={u.shape[1] - 1}")
        self.t, self.u, self.window = t, u, window
        starts = range(0, u.shape[1] - window, max(1, stride))
        self.index = [(i, s) for i in range(u.shape[0]) for s in starts]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor]:
        i, s = self.index[item]
        t = self.t[s: s + self.window + 1]
        return t - t[0], self.u[i, s: s + self.window + 1]


class PDEDataModule(SplitDataModule):
    """Trajectories of a periodic PDE from a finer pseudo-spectral solve (see the module docstring).

    Args:
        system: ``burgers`` or ``kdv`` (1-D, one channel), ``zk`` (Zakharov-Kuznetsov: 2-D, one channel) or
            ``gray_scott`` (2-D, two channels).
        dim / channels: checked against the system's (None: not checked); the ``pde`` model's config
            reads them, with ``points``, ``length``, ``diffusion``, ``dispersion``, ``known``,
            ``rollout_dt`` and ``rollout_solver``, from the data config.
        points: grid points per dimension the model sees; the reference solves on ``refine`` times as many.
        refine: the reference grid's refinement.
        length: the periodic domain's side (None: ``2 pi`` for Burgers, KdV and ZK, 32 for Gray-Scott).
        diffusion: the diffusion coefficient of each channel (None: ``[0.05]`` for Burgers' viscosity,
            ``[0.0]`` for KdV and ZK, ``[0.16, 0.08]`` for Gray-Scott's ``D_u, D_v``).
        dispersion: KdV's and ZK's ``delta^2`` (None: 0.0225 for them, 0 otherwise; only they take a nonzero one).
        known: the known part ``model=pde`` learns a correction to (None: the system's, ``diffusion``
            or ``dispersion`` for KdV and ZK); correction: how the model adds it (``add`` or ``skew``, energy
            conserving); rollout_dt / rollout_solver: the model's step and method for this system
            (None: 0.05; 1.0 suits Gray-Scott). The data do not use these four.
        n_train / n_val / n_test: trajectories per split (each split from its own seed).
        n_obs: observation intervals per trajectory (``n_obs + 1`` fields, the initial one included).
        obs_dt: time between observations.
        train_window: observation intervals in a training window; ``window_stride``: between window starts.
        solver_dt: the reference solver's largest step.
        modes / amplitude: Burgers', KdV's and ZK's initial conditions (wavenumbers up to ``modes``, standard
            deviation).
        feed / kill / patches: Gray-Scott's rates and number of initial patches.
        batch_size: examples per batch. seed: base seed. cache_dir: see the module docstring.
    """

    def __init__(
        self,
        system: str = "burgers",
        dim: int | None = None,
        channels: int | None = None,
        points: int = 64,
        refine: int = 4,
        length: float | None = None,
        diffusion: list[float] | None = None,
        dispersion: float | None = None,
        known: str | None = None,
        correction: str = "add",
        rollout_dt: float | None = None,
        rollout_solver: str = "midpoint",
        n_train: int = 32,
        n_val: int = 8,
        n_test: int = 8,
        n_obs: int = 40,
        obs_dt: float = 0.1,
        train_window: int = 10,
        window_stride: int = 5,
        solver_dt: float = 0.005,
        modes: int = 4,
        amplitude: float = 1.0,
        feed: float = 0.035,
        kill: float = 0.06,
        patches: int = 4,
        batch_size: int = 16,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size)
        if system not in SYSTEMS:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
        self.system = system
        for name, given, actual in (("dim", dim, self.dim), ("channels", channels, self.channels)):
            if given is not None and int(given) != actual:
                raise ValueError(f"system {system!r} has {name}={actual}, the config says {name}={given}")
        if points < 8 or refine < 1:
            raise ValueError(f"points must be at least 8 and refine at least 1, got {points}, {refine}")
        if n_obs < 1 or not obs_dt > 0 or not solver_dt > 0:
            raise ValueError(f"n_obs, obs_dt and solver_dt must be positive, got {n_obs}, {obs_dt}, {solver_dt}")
        if diffusion is None:
            diffusion = {"burgers": [0.05], "kdv": [0.0], "zk": [0.0], "gray_scott": [0.16, 0.08]}[system]
        if len(diffusion) != self.channels or any(not float(d) >= 0 for d in diffusion):
            raise ValueError(f"diffusion must hold {self.channels} non-negative coefficient(s), got {diffusion}")
        self.points, self.refine = int(points), int(refine)
        self.length = float(length) if length is not None else (32.0 if system == "gray_scott" else 2 * math.pi)
        self.diffusion = [float(d) for d in diffusion]
        self.dispersion = float(dispersion) if dispersion is not None else (0.0225 if system in DISPERSIVE else 0.0)
        if self.dispersion and system not in DISPERSIVE:
            raise ValueError(f"dispersion applies to systems {' and '.join(DISPERSIVE)} only, got {self.dispersion} "
                             f"for {system!r}")
        self.known = KNOWN_PART[system] if known is None else str(known)
        self.correction = str(correction)
        self.rollout_dt = 0.05 if rollout_dt is None else float(rollout_dt)
        self.rollout_solver = str(rollout_solver)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.n_obs, self.obs_dt = int(n_obs), float(obs_dt)
        self.train_window, self.window_stride = int(train_window), int(window_stride)
        self.solver_dt, self.modes, self.amplitude = float(solver_dt), int(modes), float(amplitude)
        self.feed, self.kill, self.patches = float(feed), float(kill), int(patches)
        self.seed, self.cache_dir = int(seed), cache_dir
        self.trajectories: dict[str, Tensor] = {}

    # -- what the model needs to know ------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Spatial dimensions: 1 (Burgers, KdV) or 2 (ZK, Gray-Scott)."""
        return 2 if self.system in ("zk", "gray_scott") else 1

    @property
    def channels(self) -> int:
        return 2 if self.system == "gray_scott" else 1

    @property
    def times(self) -> Tensor:
        """Observation times ``(n_obs + 1,)``."""
        return torch.arange(self.n_obs + 1, dtype=torch.float64) * self.obs_dt

    # -- the reference solver ----------------------------------------------------------------------
    def problem(self, fine: bool = True) -> Problem:
        points = self.points * (self.refine if fine else 1)
        if self.system == "burgers":
            return burgers_problem(points, self.diffusion[0], self.length)
        if self.system == "kdv":
            return kdv_problem(points, self.dispersion, self.diffusion[0], self.length)
        if self.system == "zk":
            return zk_problem(points, self.dispersion, self.diffusion[0], self.length)
        du, dv = self.diffusion
        return gray_scott_problem(points, du, dv, self.feed, self.kill, self.length)

    def initial_conditions(self, n: int, generator: torch.Generator, fine: bool = True) -> Tensor:
        """``n`` random initial fields ``(n, C, *grid)`` float64 on the fine (or coarse) grid."""
        points = self.points * (self.refine if fine else 1)
        if self.system == "zk":  # plane waves k = (k_x, k_y), |k_x|, |k_y| <= modes, amplitudes ~ 1/|k|
            x = torch.arange(points, dtype=torch.float64) * (self.length / points)
            m = torch.arange(-self.modes, self.modes + 1, dtype=torch.float64)
            ky, kx = (k.reshape(-1) for k in torch.meshgrid(m, m, indexing="ij"))
            half = (kx > 0) | ((kx == 0) & (ky > 0))  # one of each pair k, -k
            kx, ky = kx[half], ky[half]
            coef = torch.randn(n, len(kx), 2, dtype=torch.float64, generator=generator)
            coef = coef / (kx**2 + ky**2).sqrt()[:, None]
            phase = ky[:, None, None] * x[:, None] + kx[:, None, None] * x  # (modes, y, x)
            u0 = torch.einsum("nm,myx->nyx", coef[..., 0], phase.cos()) + \
                torch.einsum("nm,myx->nyx", coef[..., 1], phase.sin())
            return (u0 * (self.amplitude / u0.flatten(1).std(dim=1)[:, None, None])).unsqueeze(1)
        if self.system != "gray_scott":
            x = torch.arange(points, dtype=torch.float64) * (self.length / points)
            coef = torch.randn(n, self.modes, 2, dtype=torch.float64, generator=generator)
            k = torch.arange(1, self.modes + 1, dtype=torch.float64)
            waves = coef[..., 0, None] * torch.cos(k[:, None] * x) + coef[..., 1, None] * torch.sin(k[:, None] * x)
            u0 = (waves / k[:, None]).sum(dim=1)
            return (u0 * (self.amplitude / u0.std(dim=1, keepdim=True))).unsqueeze(1)
        u = torch.ones(n, points, points, dtype=torch.float64)
        v = torch.zeros(n, points, points, dtype=torch.float64)
        side = max(2, points // 5)
        for i in range(n):
            corners = torch.randint(0, points, (self.patches, 2), generator=generator)
            for cx, cy in corners.tolist():
                rows = [(cx + j) % points for j in range(side)]
                cols = [(cy + j) % points for j in range(side)]
                u[i][torch.tensor(rows)[:, None], torch.tensor(cols)] = 0.5
                v[i][torch.tensor(rows)[:, None], torch.tensor(cols)] = 0.25
        w = torch.stack([u, v], dim=1)
        kx, ky = _wavenumbers(points, self.length, 2)  # smooth the patches' edges: half a time unit of diffusion
        smooth = torch.exp(-0.5 * (kx**2 + ky**2))
        return torch.fft.irfftn(smooth * torch.fft.rfftn(w, dim=(-2, -1)), s=(points, points), dim=(-2, -1))

    def generate(self, n: int, seed: int) -> Tensor:
        """``n`` trajectories ``(n, n_obs + 1, C, *grid)`` float32 on the coarse grid, seeded."""
        generator = torch.Generator().manual_seed(seed)
        u0 = self.initial_conditions(n, generator, fine=True)
        fine = spectral_solve(u0, self.times.tolist(), self.problem(fine=True), self.solver_dt)
        index = (slice(None),) * 3 + (slice(None, None, self.refine),) * self.dim
        return fine[index].to(torch.float32).contiguous()

    # -- the cache -------------------------------------------------------------------------------
    def _arguments(self) -> dict[str, Any]:
        shared = dict(system=self.system, points=self.points, refine=self.refine, length=self.length,
                      diffusion=self.diffusion, n_obs=self.n_obs, obs_dt=self.obs_dt, solver_dt=self.solver_dt,
                      seed=self.seed, sizes=self.sizes, version=1)
        if self.system == "burgers":
            return {**shared, "modes": self.modes, "amplitude": self.amplitude}
        if self.system in DISPERSIVE:
            return {**shared, "modes": self.modes, "amplitude": self.amplitude, "dispersion": self.dispersion}
        return {**shared, "feed": self.feed, "kill": self.kill, "patches": self.patches}

    def cache_path(self) -> Path | None:
        """Where the generated splits are cached (None: ``cache_dir="off"``)."""
        if self.cache_dir == "off":
            return None
        if self.cache_dir is None:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nde_zoo" / "pde"
        else:
            base = Path(self.cache_dir)
        digest = hashlib.sha256(json.dumps(self._arguments(), sort_keys=True).encode()).hexdigest()[:16]
        return base / f"{self.system}-{digest}.pt"

    def load_or_generate(self) -> dict[str, Tensor]:
        """``{split: trajectories}``: from the cache when it holds them, else generated (and cached)."""
        path = self.cache_path()
        if path is not None and path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
                if all(isinstance(cached.get(s), Tensor) for s in self.sizes):
                    return {s: cached[s] for s in self.sizes}
            except Exception:  # a truncated or foreign file: regenerate it
                pass
        data = {split: self.generate(n, self.seed + i) for i, (split, n) in enumerate(self.sizes.items())}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(data, tmp)
            os.replace(tmp, path)
        return data

    def make_splits(self) -> dict[str, Dataset]:
        self.trajectories = self.load_or_generate()
        t = self.times.to(torch.float32)
        whole = {s: TensorDataset(t.expand(len(u), -1).contiguous(), u) for s, u in self.trajectories.items()}
        return {"train": WindowDataset(t, self.trajectories["train"], self.train_window, self.window_stride),
                "val": whole["val"], "test": whole["test"]}
