"""Foster's (2024) CNF table (Foster, "Reversible solvers for NDEs", talk, 2024): FFJORD on two moons.

The talk trains a continuous normalising flow on two moons with three base solvers
(midpoint, RK4, dopri5), once with the reversible solver and once with backprop, and
reports ``-E[log p]`` (0.888-0.891 nats for all six) and memory (reversible 0.56 / 0.65 /
0.70 GB against backprop's 3.9 / 7.5 / 12.8 GB: 7x / 11.5x / 18x less).

Here, at CPU scale, with :class:`nde_zoo.models.CNF` (exact trace, MLP 2 x 64 with softplus,
``t in [0, 1]``): for each base solver, rows ``Direct`` (backprop through the solve),
``Reversible`` (McCallum & Foster), ``Symplectic`` (Matsubara et al.) and ``Adjoint``
(torchdiffeq's continuous adjoint; none for rk4, which torchdiffeq lacks: its ``rk4`` is the
3/8 rule) each train a copy of the same initial flow on the same batches for a fixed budget
of Adam steps; then

- **test NLL** (nats) of each trained flow, solved as it was trained (its own strategy);
- **kept for backward**: the bytes autograd retains after the forward pass of one training
  step (``Solution.saved_bytes``, storages counted once), at the trained ``Direct`` weights
  for every row (so dopri5 takes the same steps in every row);
- **peak RSS growth** of one training step (forward + backward) in a fresh subprocess per
  row, same weights and batch: the high-water mark above the resident memory before it.

Goals (the talk's ratios): memory >= 6x / 10x / 15x lower than Direct for midpoint / rk4 /
dopri5, test NLL within 0.02 nats of Direct. Memory of a reversible backward is that of one
step's two increments whatever the number of steps ``N``, backprop's grows with ``N``, so
the ratio is about ``N / 2`` plus fixed costs: the step counts below set it.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.bench.rss import training_step_rss_growth

__all__ = ["run", "nll_loss", "SOLVERS", "ROWS", "GOALS", "goal_verdicts"]

#: base solver -> its stepping (fixed steps for the explicit ones, FFJORD's tolerances for dopri5)
SOLVERS: dict[str, dict[str, Any]] = {
    "midpoint": {"steps": 20},
    "rk4": {"steps": 20},
    "dopri5": {"rtol": 1e-5, "atol": 1e-5},
}
ROWS = ("Direct", "Reversible", "Symplectic", "Adjoint")
GOAL_RATIO = {"midpoint": 6.0, "rk4": 10.0, "dopri5": 15.0}
GOAL_NLL = 0.02
#: goal id -> what it asks; every run prints a verdict for each, per base solver
GOALS = {
    "memory": "Reversible keeps for backward, and grows peak RSS, >= 6x / 10x / 15x less than Direct "
              "(midpoint / rk4 / dopri5; the bar of another solver is 1x)",
    "nll": f"Reversible's test NLL within {GOAL_NLL} nats of Direct's",
}
TORCHDIFFEQ_SOLVERS = {"midpoint", "dopri5"}


def _strategy(row: str, solver: str, stepping: dict[str, Any]) -> Any:
    from nde_zoo.strategies import Adjoint, Direct, Reversible, Symplectic

    cls = {"Direct": Direct, "Reversible": Reversible, "Symplectic": Symplectic, "Adjoint": Adjoint}[row]
    return cls(solver, **stepping)


def _rows(solver: str, rows: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(r for r in rows if r != "Adjoint" or solver in TORCHDIFFEQ_SOLVERS)


def _build(row: str, solver: str, stepping: dict[str, Any], width: int, seed: int) -> Any:
    from nde_zoo.models import CNF

    torch.manual_seed(seed)
    return CNF(_strategy(row, solver, stepping), dim=2, width=width, depth=2)


def _train(model: Any, train: Tensor, batch: int, steps: int, lr: float, seed: int) -> dict[str, list[float]]:
    """Adam on the NLL; the batches come from ``seed``, the same for every row."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    hist: dict[str, list[float]] = {"nll": [], "seconds": [], "nfe_forward": [], "nfe_backward": []}
    for _ in range(steps):
        idx = torch.randint(len(train), (batch,), generator=generator)
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        log_p, solution = model.log_prob(train[idx])
        nll = -log_p.mean()
        nll.backward()
        optimiser.step()
        hist["seconds"].append(time.perf_counter() - start)
        hist["nll"].append(float(nll.detach()))
        hist["nfe_forward"].append(float(solution.stats.nfe_forward))
        hist["nfe_backward"].append(float(solution.stats.nfe_backward))
    return hist


@torch.no_grad()
def _test_nll(model: Any, test: Tensor) -> float:
    return float(torch.cat([-model.log_prob(chunk)[0] for chunk in test.split(1024)]).mean())


def _kept_bytes(model: Any, batch: Tensor) -> tuple[int, int]:
    """Bytes kept for backward by one training step's forward pass, and its forward NFE."""
    model.zero_grad(set_to_none=True)
    log_p, solution = model.log_prob(batch)
    (-log_p.mean()).backward()
    return int(solution.saved_bytes), int(solution.stats.nfe_forward)


def nll_loss(model: Any, batch: Tensor) -> Tensor:
    """One training step's loss, for the RSS probe (:func:`nde_zoo.bench.rss.training_step_rss_growth`)."""
    return -model.log_prob(batch)[0].mean()


def _run_solver(
    solver: str,
    stepping: dict[str, Any],
    rows: tuple[str, ...],
    cfg: dict[str, Any],
    train: Tensor,
    test: Tensor,
) -> dict[str, Any]:
    out: dict[str, Any] = {"hist": {}, "test_nll": {}, "kept": {}, "rss": {}, "probe_nfe": {}}
    models = {}
    for row in rows:
        model = _build(row, solver, stepping, cfg["width"], seed=0)
        out["hist"][row] = _train(model, train, cfg["batch"], cfg["steps"], cfg["lr"], seed=1)
        out["test_nll"][row] = _test_nll(model, test)
        models[row] = model
    reference = models.get("Direct", next(iter(models.values())))
    state = copy.deepcopy(reference.state_dict())
    out["memory"] = _memory(solver, stepping, rows, cfg, state, train[: cfg["probe_batch"]])
    out["kept"], out["rss"], out["probe_nfe"] = (
        {r: m[k] for r, m in out["memory"].items()} for k in ("kept", "rss", "nfe")
    )
    if solver == "dopri5":  # the same trained flow at tighter tolerances: more steps for Direct to keep
        out["sweep"] = {
            tol: _memory(
                solver,
                {"rtol": tol, "atol": tol},
                ("Direct", "Reversible"),
                cfg,
                state,
                train[: cfg["probe_batch"]],
            )
            for tol in cfg["sweep"]
        }
    return out


def _memory(
    solver: str,
    stepping: dict[str, Any],
    rows: tuple[str, ...],
    cfg: dict[str, Any],
    state: dict[str, Tensor],
    batch: Tensor,
) -> dict[str, dict[str, Any]]:
    """Per row at the given weights: bytes kept for backward, peak RSS growth, forward NFE."""
    out = {}
    for row in rows:
        probe = _build(row, solver, stepping, cfg["width"], seed=0)
        probe.load_state_dict(state)
        kept, nfe = _kept_bytes(probe, batch)
        rss = training_step_rss_growth(probe, batch, "nde_zoo.bench.cnf_memory:nll_loss") if cfg["rss"] else None
        out[row] = {"kept": kept, "rss": rss, "nfe": nfe}
    return out


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.4g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _describe_stepping(stepping: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in stepping.items())


def run(quick: bool = False, rows: tuple[str, ...] = ROWS) -> BenchReport:
    """Train every (solver, row) from the same initial flow on the same batches (module doc)."""
    from nde_zoo.datamodules.toy2d import sample_toy2d

    cfg = (
        dict(
            width=16, batch=64, probe_batch=64, steps=3, lr=1e-2, n_train=256, n_test=128, rss=True, sweep=()
        )
        if quick
        else dict(
            width=64,
            batch=256,
            probe_batch=512,
            steps=120,
            lr=1e-2,
            n_train=8000,
            n_test=2000,
            rss=True,
            sweep=(1e-7, 1e-9),
        )
    )
    solvers = {"midpoint": {"steps": 4}} if quick else SOLVERS
    rows = rows if not quick or rows != ROWS else ("Direct", "Reversible")
    train, test = sample_toy2d("two_moons", cfg["n_train"], 0), sample_toy2d("two_moons", cfg["n_test"], 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: extra threads only contend
    try:
        results = {s: _run_solver(s, st, _rows(s, rows), cfg, train, test) for s, st in solvers.items()}
    finally:
        torch.set_num_threads(threads)

    data = {"config": cfg, "solvers": solvers, "results": results}
    tables = [_main_table(results)]
    notes = []
    verdicts = [v for solver, res in results.items() if {"Direct", "Reversible"} <= set(res["kept"])
                for v in goal_verdicts(solver, res)]
    sweep = results.get("dopri5", {}).get("sweep")
    if sweep:
        tables.append(_sweep_table(results["dopri5"], sweep))
        notes.append(
            "Memory against steps: a reversible backward holds one step's two increments (2 x 7 stage "
            "graphs for dopri5) whatever the number of steps N, backprop holds all N steps, so the ratio "
            "is about N / 2 plus fixed costs. How many steps dopri5 takes depends on the flow learnt "
            "(NFE columns); the second table solves the same trained flow at tighter tolerances, where N "
            "and the ratio grow. The talk's flows (trained to convergence, GPU totals) took more steps."
        )
    if "Adjoint" in rows and "rk4" in results:
        notes.append(
            "Adjoint has no rk4 row: torchdiffeq has no classic RK4 (its rk4 is the 3/8 rule, our rk38)."
        )
    steppings = "; ".join(f"{s}: {_describe_stepping(st)}" for s, st in solvers.items())
    summary = (
        "Foster's CNF table (talk, 2024): FFJORD (nde_zoo.models.CNF, exact trace, "
        f"MLP 2x{cfg['width']} softplus, t in [0, 1]) on two moons, {cfg['steps']} Adam steps "
        f"(lr {cfg['lr']:g}, "
        f"batch {cfg['batch']}) per row from the same initial weights on the same batches; {steppings}. "
        f"Test NLL on {cfg['n_test']} held-out points, each flow solved as it was trained. Memory at "
        "the trained "
        f"Direct weights of each solver, on one batch of {cfg['probe_batch']}: the bytes autograd keeps for "
        "backward after the forward pass (Solution.saved_bytes) and the peak RSS growth of one training step "
        "(forward + backward) in a fresh subprocess per row. The talk: NLL 0.888-0.891 for all six; memory "
        f"Reversible / Backprop 0.56 / 3.9, 0.65 / 7.5, 0.70 / 12.8 GB (GPU). Goals: {GOALS['memory']}; "
        f"{GOALS['nll']}. "
        "The fixed step counts set the memory ratio (about N / 2, see the notes); 20 steps is our choice."
    )
    return BenchReport(name="cnf_memory", summary=summary, tables=tables, data=data, notes=notes,
                       verdicts=verdicts)


def _main_table(results: dict[str, Any]) -> Table:
    out = []
    for solver, res in results.items():
        d = "Direct" in res["kept"]
        for row in res["kept"]:
            hist = res["hist"][row]
            kept_ratio = _ratio(res["kept"].get("Direct"), res["kept"][row]) if d else None
            rss_ratio = _ratio(res["rss"].get("Direct"), res["rss"][row]) if d else None
            dnll = res["test_nll"][row] - res["test_nll"]["Direct"] if d else None
            out.append(
                [
                    solver,
                    row,
                    f"{res['test_nll'][row]:.3f}",
                    f"{dnll:+.3f}" if dnll is not None else "n/a",
                    _mb(res["kept"][row]),
                    f"{kept_ratio:.0f}x" if kept_ratio else "n/a",
                    _mb(res["rss"][row]),
                    f"{rss_ratio:.1f}x" if rss_ratio else "n/a",
                    str(res["probe_nfe"][row]),
                    f"{statistics.mean(hist['nfe_forward']):.0f} / "
                    f"{statistics.mean(hist['nfe_backward']):.0f}",
                    f"{statistics.median(hist['seconds']):.3f}",
                ]
            )
    return Table(
        title="CNF on two moons: test NLL and memory per base solver and gradient strategy",
        columns=[
            "solver",
            "method",
            "test NLL",
            "vs Direct",
            "kept for backward MB",
            "kept: Direct / this",
            "peak RSS growth MB",
            "RSS: Direct / this",
            "NFE fwd (memory probe)",
            "NFE fwd / bwd (training mean)",
            "s / step",
        ],
        rows=out,
    )


def _sweep_table(res: dict[str, Any], sweep: dict[float, dict[str, Any]]) -> Table:
    out = []
    for tol, memory in {1e-5: res["memory"], **sweep}.items():
        d, r = memory["Direct"], memory["Reversible"]
        rss = _ratio(d["rss"], r["rss"])
        out.append(
            [
                f"{tol:g}",
                str(d["nfe"]),
                _mb(d["kept"]),
                _mb(r["kept"]),
                _mb(d["rss"]),
                _mb(r["rss"]),
                f"{rss:.1f}x" if rss else "n/a",
            ]
        )
    return Table(
        title="dopri5, the same trained flow at tighter tolerances (rtol = atol): "
        "memory against the number of steps",
        columns=[
            "rtol = atol",
            "NFE fwd",
            "Direct kept MB",
            "Reversible kept MB",
            "Direct peak RSS growth MB",
            "Reversible peak RSS growth MB",
            "Direct / Reversible (RSS)",
        ],
        rows=out,
    )


def goal_verdicts(solver: str, res: dict[str, Any], table: int = 0) -> list[Verdict]:
    """The memory and NLL goals on one base solver, from ``res`` (``_run_solver``'s result) and
    the rows ``(solver, Direct)``, ``(solver, Reversible)`` of ``tables[table]``.

    A missing RSS reading (no ``/proc``, or a probe that was off) makes the memory goal "not
    measured", never met.
    """
    goal = GOAL_RATIO.get(solver, 1.0)
    rows = ((solver, "Reversible"), (solver, "Direct"))
    nll, kept, rss = res["test_nll"], res["kept"], res["rss"]
    return [
        Verdict("memory", solver, (
            Check("Direct / Reversible kept for backward", _ratio(kept["Direct"], kept["Reversible"]),
                  ">=", goal, Source(table, rows[::-1], ("kept for backward MB",), "ratio"), fmt=".1f", unit="x"),
            Check("Direct / Reversible peak RSS growth", _ratio(rss["Direct"], rss["Reversible"]),
                  ">=", goal, Source(table, rows[::-1], ("peak RSS growth MB",), "ratio"), fmt=".1f", unit="x"),
        )),
        Verdict("nll", solver, (Check(
            "|Reversible - Direct| test NLL", abs(nll["Reversible"] - nll["Direct"]), "<=", GOAL_NLL,
            Source(table, rows, ("test NLL",), "absdiff"), fmt=".3f"),)),
    ]
