"""Foster's (2024) white-dwarf table: reversible vs binomial checkpointing vs backprop.

Chandrasekhar's white dwarf equation as McCallum & Foster set it up (Foster 2024; McCallum & Foster 2024, arXiv:2410.11648):

    dx/dt = v,   dv/dt = -(x^2 - C)^(3/2) - 2 v / (t + 0.5),   C = 0.001,  (x, v)(0) = (1, 0),

on t in [0, 5] with explicit midpoint at h = 0.005 (N = 1000 steps; ``--quick``: h = 0.05,
N = 100); the targets are the states after every step. A Neural ODE
``f(t, y) = W2 tanh(W1 [t, x, v] + b1) + b2`` of
width 10, float64, MSE, AdamW (lr 1e-2), full batch, trained for a fixed number of steps
with each gradient strategy from the same initial weights. Exact strategies give the same
losses; what differs is time and memory, so the report is the time-memory frontier: every
row's seconds per step against its peak autograd memory (what the forward pass keeps plus
the most the backward pass holds at once, :mod:`.autograd_memory`), as a table and a
picture, and which strategy is fastest at each memory level.

Second table: the real-axis extent of the linear stability region of the reversible
midpoint/RK3/RK4 (and Euler) at coupling 0.8 and 0.999 against their base methods, from
the spectral radius of the reversible step's 2x2 amplification matrix on ``y' = lam y``.
Third: the memory-bound regime (a wide state), where not keeping a trajectory pays; fourth:
peak RSS growth against N (flat for Reversible, linear for Direct).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn

from nde_zoo.bench.autograd_memory import peak_autograd_bytes
from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.bench.runner import on_one_thread
from nde_zoo.solvers import ButcherTableau, Stepping, get_tableau, odeint
from nde_zoo.strategies import Checkpoint, Direct, GradientStrategy, Reversible

__all__ = ["run", "white_dwarf_data", "stability_extent", "amplification", "frontier", "GOALS"]

C = 0.001
H = 0.005
T_END = 5.0
TIME_BAR = 2.8  # the cost model: 4s evaluations + 2s VJPs against s + s, about 2.7x
FLAT_BAR = 1.5
#: goal id -> what it asks; every run prints a verdict for each
GOALS = {
    "time": f"Reversible's seconds per training step <= {TIME_BAR}x Direct's on the white dwarf problem",
    "flat": f"Reversible's peak RSS growth flat in N (largest N / smallest N <= {FLAT_BAR})",
}


def white_dwarf_field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, v = y[..., 0], y[..., 1]
    dv = -(x * x - C).clamp_min(0.0) ** 1.5 - 2.0 * v / (t + 0.5)
    return torch.stack([v, dv], dim=-1)


def white_dwarf_data(h: float = H) -> tuple[torch.Tensor, torch.Tensor]:
    """``ts`` ``(N + 1,)`` (N = 1000 at h = 0.005) and the true states ``(N + 1, 1, 2)`` (tight dopri5)."""
    ts = torch.linspace(0.0, T_END, int(round(T_END / h)) + 1, dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        ys, _, _ = odeint(white_dwarf_field, y0, ts, get_tableau("dopri5"), Stepping.of(rtol=1e-10, atol=1e-12))
    return ts, ys


class WhiteDwarfODE(nn.Module):
    """``f(t, y) = W2 tanh(W1 [t, x, v] + b1) + b2``."""

    def __init__(self, width: int = 10) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, width)
        self.l2 = nn.Linear(width, 2)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(torch.cat([t.expand(y.shape[0], 1), y], dim=-1))))


def _train(strategy: GradientStrategy, ts, target, steps: int, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    field = WhiteDwarfODE().double()
    optimiser = torch.optim.AdamW(field.parameters(), lr=1e-2)
    y0 = target[0]
    times, loss, saved, peak = [], float("nan"), 0, 0
    for step in range(steps):
        start = time.perf_counter()
        optimiser.zero_grad()
        sol = strategy.solve(field, y0, ts)
        loss_t = (sol.ys - target).pow(2).mean()
        if step == steps - 1:  # the last step also counts what backward holds (slower: not timed)
            saved = sol.saved_bytes
            peak = peak_autograd_bytes(loss_t, saved, list(field.parameters()))
            optimiser.step()
            loss = loss_t.item()
            continue
        loss_t.backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
        loss = loss_t.item()
    return {"loss": loss, "seconds": statistics.median(times), "saved_bytes": saved, "peak_bytes": peak}


def frontier(rows: dict[str, tuple[float, float]]) -> list[dict[str, object]]:
    """The time-memory frontier of ``{name: (seconds, memory)}``.

    One entry per distinct memory level (ascending): ``memory``, the ``rows`` there, and the
    ``fastest`` row among all that need at most that much memory, with its ``seconds``. Ties in
    time go to the smaller memory.
    """
    out = []
    for level in sorted({m for _, m in rows.values()}):
        fits = [(sec, mem, name) for name, (sec, mem) in rows.items() if mem <= level]
        sec, _, name = min(fits)
        out.append({"memory": level, "rows": [n for n, (_, m) in rows.items() if m == level],
                    "fastest": name, "seconds": sec})
    return out


def frontier_statements(levels: list[dict[str, object]], unit: str = "KiB") -> list[str]:
    """Plain sentences: which row is fastest from which memory level up to the next change."""
    out, spans = [], []
    for level in levels:
        if spans and spans[-1][1] == level["fastest"]:
            continue
        spans.append((level["memory"], level["fastest"], level["seconds"]))
    for i, (memory, name, seconds) in enumerate(spans):
        upto = f"up to {spans[i + 1][0] / 1024:.2f} {unit} (excluded)" if i + 1 < len(spans) else "and more"
        out.append(f"With {memory / 1024:.2f} {unit} of autograd memory {upto}, the fastest is {name} "
                   f"({seconds:.3f} s / step).")
    return out


def _frontier_figure(results: dict[str, dict[str, float]], levels: list[dict[str, object]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.scatter(r["peak_bytes"] / 1024, r["seconds"], s=25)
        ax.annotate(name, (r["peak_bytes"] / 1024, r["seconds"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    xs = [lv["memory"] / 1024 for lv in levels]
    ax.step(xs, [lv["seconds"] for lv in levels], where="post", color="k", lw=1,
            label="fastest within that much memory")
    ax.set_xscale("log")
    ax.set_xlabel("peak autograd memory (KiB)")
    ax.set_ylabel("seconds per training step")
    ax.set_title("White dwarf: time against memory per gradient strategy", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _tableau_R(tableau: ButcherTableau, z: np.ndarray) -> np.ndarray:
    """The stability function ``R(z) = 1 + z b^T (I - z A)^{-1} 1`` (explicit: a finite sum)."""
    s = tableau.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tableau.a):
        A[i, : len(row)] = row
    b = np.array(tableau.b)
    # Explicit A is nilpotent: (I - zA)^{-1} 1 = sum_k (zA)^k 1.
    out = np.ones_like(z, dtype=complex)
    term = np.ones(s)
    for k in range(1, s + 1):
        coeff = b @ term  # b^T A^{k-1} 1
        out = out + coeff * z**k
        term = A @ term
    return out


def amplification(tableau: ButcherTableau, coupling: float, z: np.ndarray) -> np.ndarray:
    """Spectral radius of the reversible step on ``y' = lam y`` with ``z = h lam``."""
    r_plus, r_minus = _tableau_R(tableau, z), _tableau_R(tableau, -z)
    lam = coupling
    m11, m12 = lam, r_plus - lam
    m21 = -(r_minus - 1.0) * lam
    m22 = 1.0 - (r_minus - 1.0) * (r_plus - lam)
    trace, det = m11 + m22, m11 * m22 - m12 * m21
    disc = np.sqrt(trace * trace - 4 * det + 0j)
    return np.maximum(np.abs((trace + disc) / 2), np.abs((trace - disc) / 2))


def stability_extent(radius_fn, x_max: float = 10.0, n: int = 20001) -> float:
    """Largest ``x`` with spectral radius <= 1 on all of ``[-x, 0]`` of the real axis."""
    xs = np.linspace(0.0, x_max, n)
    rho = radius_fn(-xs.astype(complex))
    bad = np.nonzero(rho > 1.0 + 1e-9)[0]
    return float(xs[bad[0] - 1]) if len(bad) else float(x_max)


def _stability_table() -> tuple[Table, dict, object]:
    solvers = [("Euler", "euler"), ("midpoint", "midpoint"), ("RK3 (ralston3)", "ralston3"), ("RK4", "rk4")]
    rows, data = [], {}
    for label, name in solvers:
        tab = get_tableau(name)
        base = stability_extent(lambda z: np.abs(_tableau_R(tab, z)))
        rev = {c: stability_extent(lambda z, c=c: amplification(tab, c, z)) for c in (0.8, 0.999)}
        data[name] = {"base": base, "reversible_0.8": rev[0.8], "reversible_0.999": rev[0.999]}
        rows.append([label, f"{base:.3f}", f"{rev[0.8]:.3f}", f"{rev[0.999]:.3f}"])
    figure = _stability_figure(solvers)
    return Table("Linear stability: real-axis extent x (stable for h*lam in [-x, 0])",
                 ["base solver", "base", "reversible, coupling 0.8", "reversible, coupling 0.999"], rows), data, figure


def _stability_figure(solvers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    re, im = np.meshgrid(np.linspace(-4.5, 1.5, 400), np.linspace(-3.5, 3.5, 400))
    z = re + 1j * im
    fig, axes = plt.subplots(1, len(solvers), figsize=(4 * len(solvers), 3.8), sharey=True)
    for ax, (label, name) in zip(axes, solvers):
        tab = get_tableau(name)
        ax.contourf(re, im, (np.abs(_tableau_R(tab, z)) <= 1).astype(float), levels=[0.5, 1.5], colors=["#9ecae1"])
        ax.contourf(re, im, (amplification(tab, 0.8, z) <= 1 + 1e-9).astype(float), levels=[0.5, 1.5],
                    colors=["#fdae6b"], alpha=0.6)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{label}: base (blue), reversible c=0.8 (orange)", fontsize=8)
        ax.set_xlabel("Re(h lam)")
    axes[0].set_ylabel("Im(h lam)")
    fig.tight_layout()
    return fig


def _large_state(quick: bool) -> tuple[Table, dict]:
    batch, dim, width, steps = (64, 16, 32, 10) if quick else (2048, 64, 128, 100)
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = field

        def forward(self, t, y):
            return self.net(y)

    f = Field()
    y0 = torch.randn(batch, dim)
    ts = torch.tensor([0.0, 1.0])
    strategies = {"Direct": Direct("midpoint", steps=steps), "Reversible": Reversible("midpoint", steps=steps)}
    samples: dict[str, list[float]] = {k: [] for k in strategies}
    saved = {}
    for repeat in range(3 if quick else 5):
        for name, strategy in strategies.items():
            start = time.perf_counter()
            sol = strategy.solve(f, y0, ts)
            sol.ys[-1].square().mean().backward()
            if repeat:  # the first round warms up
                samples[name].append(time.perf_counter() - start)
            saved[name] = sol.saved_bytes
    t = {k: statistics.median(v) for k, v in samples.items()}
    rows = [[k, f"{t[k]:.3f}", f"{t[k] / t['Direct']:.2f}", f"{saved[k] / 2**20:.2f}"] for k in strategies]
    return Table(f"Memory-bound regime: batch {batch} x {dim}, MLP width {width}, midpoint, N={steps}, float32",
                 ["strategy", "s per fwd+bwd", "time / Direct", "saved MiB"], rows), {"seconds": t, "saved": saved}


def _rss_table(quick: bool) -> tuple[Table, dict]:
    """Peak RSS growth of one fwd+bwd in a fresh process per cell: flat for Reversible."""
    from nde_zoo.bench.rss import peak_rss_growth_mib

    batch, dim, width = (256, 32, 64) if quick else (1024, 64, 128)
    ns = (10, 20) if quick else (25, 50, 100, 200)
    kinds = ("reversible",) if quick else ("direct", "reversible")  # each cell is a fresh process
    growth = {s: {n: peak_rss_growth_mib(s, n, batch, dim, width) for n in ns} for s in kinds}
    rows = [[name.capitalize(), *(f"{growth[name][n]:.1f}" for n in ns)] for name in growth]
    return Table(f"Peak RSS growth (MiB) of one fwd+bwd, fresh process per cell: batch {batch} x {dim}, "
                 f"width {width}, midpoint, float32", ["strategy", *(f"N={n}" for n in ns)], rows), growth


def run(quick: bool = False) -> BenchReport:
    return on_one_thread(_run, quick)


def _run(quick: bool) -> BenchReport:
    h = 0.05 if quick else H
    ts, truth = white_dwarf_data(h)
    n_steps = len(ts) - 1
    train_steps = 3 if quick else 20
    snapshots = (4, 16) if quick else (2, 4, 8, 16, 32, 44)
    strategies: dict[str, GradientStrategy] = {"Reversible": Reversible("midpoint", step_size=h)}
    strategies |= {f"Checkpoint c={c}": Checkpoint("midpoint", step_size=h, snapshots=c) for c in snapshots}
    strategies["Direct"] = Direct("midpoint", step_size=h)
    results = {name: _train(s, ts, truth, train_steps) for name, s in strategies.items()}
    direct = results["Direct"]["seconds"]
    losses = [r["loss"] for r in results.values()]
    rows = [
        [name, f"{r['loss']:.6e}", f"{r['seconds']:.3f}", f"{r['seconds'] / direct:.2f}",
         f"{r['saved_bytes'] / 1024:.2f}", f"{r['peak_bytes'] / 1024:.2f}"]
        for name, r in results.items()
    ]
    levels = frontier({name: (r["seconds"], r["peak_bytes"]) for name, r in results.items()})
    frontier_rows = [[f"{lv['memory'] / 1024:.2f}", ", ".join(lv["rows"]), lv["fastest"],
                      f"{lv['seconds']:.3f}"] for lv in levels]
    stability, stability_data, figure = _stability_table()
    rss, rss_data = _rss_table(quick)
    large, large_data = _large_state(quick)
    ns = sorted(rss_data["reversible"])
    flat = rss_data["reversible"][ns[-1]] / rss_data["reversible"][ns[0]]
    verdicts = [
        Verdict("time", f"white dwarf, N={n_steps}", (Check(
            "Reversible s / step / Direct's", results["Reversible"]["seconds"] / direct, "<=", TIME_BAR,
            Source(0, ("Reversible", "Direct"), ("s / step",), "ratio"), unit="x"),)),
        Verdict("flat", "memory-bound field", (Check(
            f"Reversible peak RSS growth N={ns[-1]} / N={ns[0]}", flat, "<=", FLAT_BAR,
            Source(4, ("Reversible",), (f"N={ns[-1]}", f"N={ns[0]}"), "ratio"), unit="x"),)),
    ]
    notes = [
        f"Final losses agree to {max(losses) - min(losses):.2e} (exact strategies differentiate the same "
        "discretisation; Reversible's forward is the reversible midpoint scheme, the others plain midpoint, "
        "so its loss differs at the discretisation-error level).",
        *frontier_statements(levels),
    ]
    small = [r["peak_bytes"] for n, r in results.items() if n != "Direct"]
    notes.append(
        f"Reversible and every checkpoint row lie within {(max(small) - min(small)) / 1024:.2f} KiB of "
        f"peak autograd memory of each other ({min(small) / 1024:.2f}-{max(small) / 1024:.2f} KiB): on a "
        "2-d state a snapshot is 16 bytes, so here memory hardly separates them and the frontier's order among them is "
        "that of their times; the memory-bound table below is where not keeping a trajectory matters.")
    return BenchReport(
        name="white_dwarf",
        summary=(
            "Foster's (2024) white-dwarf table: a width-10 Neural ODE (float64) fitted to Chandrasekhar's white "
            f"dwarf equation on [0, 5] with explicit midpoint, h = {h} (N = {n_steps} steps, a loss on every "
            f"step), AdamW lr 1e-2, full batch, {train_steps} training steps per row from the same initial "
            "weights. Time is the median seconds per training step measured in one run (the last step, "
            "which counts memory, is not timed); 'kept' is the bytes autograd keeps for backward after the "
            "forward pass (a trajectory for Direct, snapshots for Checkpoint, three states for Reversible), "
            "'peak autograd' adds the most the backward pass holds at once (Checkpoint's recomputed "
            "segments, Reversible's rebuilt step). The frontier table lists, for each memory level, the "
            f"fastest strategy that fits in it. Goals: {GOALS['time']}; {GOALS['flat']}."
        ),
        tables=[
            Table("Training on the white dwarf equation",
                  ["strategy", "final loss", "s / step", "time / Direct", "kept KiB", "peak autograd KiB"], rows),
            Table("Time-memory frontier: the fastest strategy within each memory level",
                  ["peak autograd KiB", "strategies at this level", "fastest within it", "its s / step"],
                  frontier_rows),
            stability,
            large,
            rss,
        ],
        data={"training": results, "frontier": levels, "stability": stability_data, "large_state": large_data,
              "rss": rss_data},
        figures={"frontier": _frontier_figure(results, levels), "stability": figure},
        notes=notes,
        verdicts=verdicts,
    )
