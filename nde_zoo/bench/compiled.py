"""Eager against compiled (``compile=True``) per strategy: time per training step, compile cost, memory.

Each row runs in a fresh process (``python -m nde_zoo.bench.compiled --probe ...``), so peak
RSS growth is that row's own and compile time is not hidden by an earlier row's warm caches
(``--quick``, a smoke test of the harness, runs its two rows in this process, without RSS):

- ``s / step``: median wall time of a full training step (solve, loss, backward, AdamW step)
  after the first call; the eager and compiled rows of a problem run back to back;
- ``first call``: the first training step, which compiles (Inductor; on-disk cache cold);
- ``cached``: the first step of the same job in a new process with Inductor's on-disk cache
  warm (``TORCHINDUCTOR_CACHE_DIR`` shared between the two processes);
- ``kept``: bytes autograd keeps for backward (``Solution.saved_bytes``);
- ``RSS``: peak RSS growth of one training step after warm-up.

Problems: Foster's (2024) white dwarf (``bench white_dwarf``'s: 2-d state, width-10 MLP, float64,
N = 1000 midpoint steps, targets at every step), the two-moons FFJORD (exact trace, batch
256, float32, midpoint and rk4, 20 steps; and adaptive dopri5 at rtol = atol = 1e-5, where each
step and each step's reverse are compiled programs), and a memory-bound case (batch 2048 x 64, width
128, float32, midpoint, N = 100). With ``jax`` and ``diffrax`` installed (never in CI) the white
dwarf also runs in diffrax, in the same run, with ``RecursiveCheckpointAdjoint`` (its default
checkpoints, and every step stored), and ``BacksolveAdjoint``.

``NDE_ZOO_BENCH_COMPILED_PROBLEMS=white_dwarf,memory_bound`` runs only those problems (the full
run takes most of an hour on 2 CPU cores, the CNF's compiles most of it); its verdicts on the
problems left out read "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from nde_zoo.bench.report import BenchReport, Table

__all__ = ["run", "PROBLEMS"]

STRATEGY_NAMES = ("direct", "checkpoint", "symplectic", "reversible")

#: problem -> (solver, steps, strategies); quick runs shrink N and the strategy list.
PROBLEMS: dict[str, dict[str, Any]] = {
    "white_dwarf": {"solver": "midpoint", "steps": 1000, "quick_steps": 100},
    # the same field counting its calls (self.nfe += 1, torchdiffeq's examples): compiled traced
    "white_dwarf_counting": {"solver": "midpoint", "steps": 1000, "quick_steps": 100},
    "cnf_midpoint": {"solver": "midpoint", "steps": 20, "quick_steps": 4},
    "cnf_rk4": {"solver": "rk4", "steps": 20, "quick_steps": 4},
    "memory_bound": {"solver": "midpoint", "steps": 100, "quick_steps": 4},
    # adaptive: each step and each step's reverse are compiled programs (steps: 0, the solver picks them)
    "cnf_dopri5": {"solver": "dopri5", "tolerance": 1e-5, "steps": 0, "quick_steps": 0},
}


# -- one row (in its own process, but for --quick) -----------------------------------------------
def _problem(name: str, steps: int):
    """``(field, y0, ts, loss_fn)`` of a problem."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name.startswith("white_dwarf"):
        from nde_zoo.bench.white_dwarf import WhiteDwarfODE, white_dwarf_data

        class Counting(WhiteDwarfODE):
            def __init__(self) -> None:
                super().__init__()
                self.nfe = 0

            def forward(self, t, y):  # type: ignore[no-untyped-def]
                self.nfe += 1
                return super().forward(t, y)

        ts, target = white_dwarf_data()
        ts, target = ts[: steps + 1], target[: steps + 1]
        field = (Counting if name == "white_dwarf_counting" else WhiteDwarfODE)().double()
        return field, target[0], ts, lambda ys: (ys - target).pow(2).mean()
    if name.startswith("cnf"):
        from sklearn.datasets import make_moons

        from nde_zoo.models.cnf import CNFField

        field = CNFField(dim=2, width=64, depth=2, exact_trace_max_dim=8, noise="rademacher")
        x, _ = make_moons(256, noise=0.05, random_state=0)
        y0 = torch.cat([torch.tensor(x, dtype=torch.float32), torch.zeros(256, 1)], dim=1)
        ts = torch.tensor([0.0, 1.0])

        def nll(ys: torch.Tensor) -> torch.Tensor:
            z, delta = ys[-1, :, :2], ys[-1, :, 2]
            return (0.5 * z.pow(2).sum(1) + delta).mean()

        return field, y0, ts, nll
    if name == "memory_bound":

        class Field(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))

            def forward(self, t, y):
                return self.net(y)

        return Field(), torch.randn(2048, 64), torch.tensor([0.0, 1.0]), lambda ys: ys[-1].square().mean()
    raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")


def _strategy(name: str, problem: str, steps: int, compiled: bool):
    from nde_zoo.strategies import Checkpoint, Direct, Reversible, Symplectic

    kwargs: dict[str, Any] = {"compile": "strict" if compiled else False}
    tolerance = PROBLEMS[problem].get("tolerance")
    if tolerance is not None:  # adaptive; Checkpoint keeps every accepted step start (ACA)
        kwargs.update(rtol=tolerance, atol=tolerance)
    else:
        kwargs["steps"] = steps
        if name == "checkpoint":
            kwargs["snapshots"] = max(2, round(steps**0.5))  # sqrt(N) snapshots
    return {"direct": Direct, "checkpoint": Checkpoint, "symplectic": Symplectic, "reversible": Reversible}[name](
        PROBLEMS[problem]["solver"], **kwargs
    )


def _vm_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _outside_fraction(train_step: Any) -> float:
    """The share of one training step's wall time spent outside the compiled programs: the driver's
    checks and bookkeeping, autograd's Functions and hooks, the loss and the optimiser step.

    Inside is what the profiler records as calls of compiled graphs (``CompiledFxGraph``): the
    forward programs, and the backward ones whether autograd runs them (Direct) or the strategy's
    backward does. The profiler's own cost counts as outside, so the figure errs high.
    """
    import torch

    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        train_step()
        wall_us = (time.perf_counter() - start) * 1e6
    inside_us = sum(e.cpu_time_total for e in prof.events() if "CompiledFxGraph" in e.name)
    return max(0.0, 1.0 - inside_us / wall_us)


def probe(problem: str, strategy: str, compiled: bool, steps: int, repeats: int,
          rss: bool = True) -> dict[str, Any]:
    """One row: time the first step, ``repeats`` more, then (``rss``) one step's peak RSS growth."""
    import torch

    torch.set_num_threads(int(os.environ.get("NDE_ZOO_BENCH_THREADS", "1")))
    field, y0, ts, loss_fn = _problem(problem, steps)
    chosen = _strategy(strategy, problem, steps, compiled)
    optimiser = torch.optim.AdamW(field.parameters(), lr=1e-3)

    driver_seconds = [0.0]

    def train_step() -> Any:
        # The driver's time: the solve's forward and backward, less the calls of its compiled
        # programs (Programs.run_seconds). A backward that calls no program (Direct: autograd runs
        # the compiled program's own backward) is torch's, none of it the driver's.
        optimiser.zero_grad()
        programs, start = chosen.programs.run_seconds, time.perf_counter()
        sol = chosen.solve(field, y0, ts)
        driver = time.perf_counter() - start - (chosen.programs.run_seconds - programs)
        loss = loss_fn(sol.ys)
        programs, start = chosen.programs.run_seconds, time.perf_counter()
        loss.backward()  # the solve's backward (and the loss's own, a few element-wise ops: errs high)
        if chosen.programs.run_seconds > programs:
            driver += time.perf_counter() - start - (chosen.programs.run_seconds - programs)
        driver_seconds[0] = driver
        optimiser.step()
        return sol

    start = time.perf_counter()
    sol = train_step()
    first = time.perf_counter() - start
    times, driver = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        sol = train_step()
        times.append(time.perf_counter() - start)
        driver.append(driver_seconds[0] / times[-1])
    # only Inductor's programs show in the profiler as compiled graphs
    inductor = os.environ.get("NDE_ZOO_COMPILE_BACKEND", "inductor") == "inductor"
    outside = _outside_fraction(train_step) if compiled and inductor else None
    rss_growth = None
    try:
        if not rss:
            raise OSError("not measured in this process")
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _vm_kib("VmRSS:")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the high-water mark to the current RSS
        train_step()
        rss_growth = (_vm_kib("VmHWM:") - before) / 1024.0
    except OSError:
        pass
    return {
        "first_call_s": first,
        "s_per_step": statistics.median(times),
        "saved_bytes": sol.saved_bytes,
        "rss_growth_mib": rss_growth,
        "outside_fraction": outside,
        # the solve's forward and backward less the calls of its compiled programs: the driver's checks,
        # bookkeeping and the field's probe, as a share of the training step (median)
        "driver_fraction": statistics.median(driver) if compiled and chosen.programs.run_seconds else None,
        "compiles": chosen.programs.compiles,
        "compile_s": chosen.programs.compile_seconds,
    }


def _probe_here(problem: str, strategy: str, compiled: bool, steps: int, repeats: int,
                backend: str | None) -> dict[str, Any]:
    """A probe in this process (the quick run: its figures are a smoke test, not measurements,
    and a fresh process per row cost 7 s of imports each)."""
    import torch

    from nde_zoo.driver.programs import BACKEND_ENV

    threads, saved = torch.get_num_threads(), os.environ.get(BACKEND_ENV)
    if backend is not None:
        os.environ[BACKEND_ENV] = backend
    try:
        with torch.random.fork_rng(devices=[]):  # the problem seeds the global generator
            return probe(problem, strategy, compiled, steps, repeats, rss=False)  # RSS: the caller's
    except Exception as error:  # noqa: BLE001 - a row that fails is an error row, as from a subprocess
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        torch.set_num_threads(threads)
        if saved is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = saved


def _run_probe(problem: str, strategy: str, compiled: bool, steps: int, repeats: int,
               cache_dir: str, backend: str | None = None, here: bool = False) -> dict[str, Any]:
    if here:
        return _probe_here(problem, strategy, compiled, steps, repeats, backend)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    if backend is not None:
        env["NDE_ZOO_COMPILE_BACKEND"] = backend
    out = subprocess.run(
        [sys.executable, "-m", "nde_zoo.bench.compiled", "--probe", problem, strategy,
         "compiled" if compiled else "eager", str(steps), str(repeats)],
        capture_output=True, text=True, timeout=1800, env=env,
    )
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- diffrax (optional) ---------------------------------------------------------------------------
def _diffrax_rows(steps: int, repeats: int) -> dict[str, dict[str, float]] | None:
    """The white dwarf in diffrax, when jax and diffrax are installed; ``None`` otherwise."""
    try:
        import diffrax  # noqa: F401
        import jax  # noqa: F401
    except ImportError:
        return None
    out = subprocess.run([sys.executable, "-m", "nde_zoo.bench._diffrax_white_dwarf", str(steps), str(repeats)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": {"message": (out.stderr or out.stdout).strip().splitlines()[-1]}}  # type: ignore[dict-item]
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the report -------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def verdict(goal: str, ratio: float | None, threshold: float, *, at_least: bool) -> str:
    """A goal line computed from the measured ratio: met, missed, or not measured."""
    if ratio is None:
        return f"{goal}: not measured"
    met = ratio >= threshold if at_least else ratio <= threshold
    return f"{goal}: {'met' if met else 'missed'} ({ratio:.3g}x)"


PROBLEMS_ENV = "NDE_ZOO_BENCH_COMPILED_PROBLEMS"


def _chosen_problems() -> list[str]:
    """Every problem, or those named in ``NDE_ZOO_BENCH_COMPILED_PROBLEMS`` (comma-separated)."""
    chosen = [p.strip() for p in os.environ.get(PROBLEMS_ENV, "").split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PROBLEMS]
    if unknown:
        raise ValueError(f"{PROBLEMS_ENV} names unknown problems {unknown}: choose among {', '.join(PROBLEMS)}")
    return chosen or list(PROBLEMS)


def run(quick: bool = False) -> BenchReport:
    repeats = 3 if quick else 5
    # --quick is a smoke test of the harness (CI): aot_eager compiles in seconds; its times are
    # not Inductor's and say nothing about speed
    backend = "aot_eager" if quick else None
    problems = ["white_dwarf"] if quick else _chosen_problems()
    strategies = ("reversible",) if quick else STRATEGY_NAMES
    results: dict[str, dict[str, dict[str, Any]]] = {}
    tables: list[Table] = []
    with tempfile.TemporaryDirectory(prefix="nde_zoo_inductor_") as cache:
        for problem in problems:
            steps = PROBLEMS[problem]["quick_steps" if quick else "steps"]
            rows, results[problem] = [], {}
            for strategy in strategies:
                eager = _run_probe(problem, strategy, False, steps, repeats, cache, backend, here=quick)
                compiled = _run_probe(problem, strategy, True, steps, repeats, cache, backend, here=quick)
                cached = (_run_probe(problem, strategy, True, steps, 1, cache, backend)
                          if problem == "white_dwarf" and not quick else {})
                results[problem][strategy] = {"eager": eager, "compiled": compiled, "cached": cached}
                if "error" in eager or "error" in compiled:
                    rows.append([strategy, "error", "", "", eager.get("error", compiled.get("error", "")), "", "", "", "",
                                 ""])
                    continue
                speedup = eager["s_per_step"] / compiled["s_per_step"]
                results[problem][strategy]["speedup"] = speedup
                rows.append([
                    strategy, f"{eager['s_per_step']:.4f}", f"{compiled['s_per_step']:.4f}", f"{speedup:.2f}x",
                    f"{compiled['first_call_s']:.1f}", _fmt(cached.get("first_call_s"), ".1f"),
                    _fmt(None if compiled.get("driver_fraction") is None else 100 * compiled["driver_fraction"], ".1f"),
                    _fmt(None if compiled.get("outside_fraction") is None else 100 * compiled["outside_fraction"], ".0f"),
                    f"{eager['saved_bytes']:,} / {compiled['saved_bytes']:,}",
                    f"{_fmt(eager['rss_growth_mib'], '.1f')} / {_fmt(compiled['rss_growth_mib'], '.1f')}",
                ])
            solver, tolerance = PROBLEMS[problem]["solver"], PROBLEMS[problem].get("tolerance")
            stepping = f"rtol = atol = {tolerance:g}" if tolerance is not None else f"N = {steps}"
            tables.append(Table(
                f"{problem}: {solver}, {stepping}, one training step (solve, loss, backward, AdamW)",
                ["strategy", "eager s/step", "compiled s/step", "speed-up", "first call s (cold cache)",
                 "first call s (warm cache)", "% of the step in the driver", "% outside Inductor's graphs (profiler)",
                 "kept bytes eager / compiled",
                 "peak RSS growth MiB eager / compiled"],
                rows,
            ))
    diffrax = None if quick else _diffrax_rows(PROBLEMS["white_dwarf"]["steps"], repeats)
    if diffrax is not None:
        tables.append(Table("white_dwarf in diffrax (JAX, same run)", ["adjoint", "s/step"],
                            [[k, _fmt(v.get("s_per_step"), ".4f")] for k, v in diffrax.items()]))
    results["diffrax"] = diffrax or {}

    def ratio(problem: str, strategy: str) -> float | None:
        return results.get(problem, {}).get(strategy, {}).get("speedup")

    def seconds(strategy: str) -> float | None:
        return results.get("white_dwarf", {}).get(strategy, {}).get("compiled", {}).get("s_per_step")

    def against_diffrax(ours: float | None, theirs_key: str) -> float | None:
        theirs = (diffrax or {}).get(theirs_key, {}).get("s_per_step")
        return None if ours is None or theirs is None else ours / theirs

    counting = [ratio("white_dwarf_counting", s) for s in STRATEGY_NAMES]
    slower_memory_bound = [
        s for s, r in results.get("memory_bound", {}).items() if r.get("speedup") is not None and r["speedup"] < 1.0
    ]
    notes = [
        verdict("compiled Reversible >= 20x eager Reversible (white dwarf)", ratio("white_dwarf", "reversible"),
                20.0, at_least=True),
        verdict("compiled Direct >= 10x eager Direct (white dwarf)", ratio("white_dwarf", "direct"), 10.0,
                at_least=True),
        verdict("compiled Reversible no slower than diffrax RecursiveCheckpointAdjoint (time ratio <= 1)",
                against_diffrax(seconds("reversible"), "RecursiveCheckpointAdjoint"), 1.0, at_least=False),
        verdict("compiled Symplectic no slower than diffrax RecursiveCheckpointAdjoint (time ratio <= 1)",
                against_diffrax(seconds("symplectic"), "RecursiveCheckpointAdjoint"), 1.0, at_least=False),
        verdict("compiled Direct within 1.5x of diffrax storing every step (time ratio <= 1.5)",
                against_diffrax(seconds("direct"), "RecursiveCheckpointAdjoint(every step)"), 1.5, at_least=False),
    ]
    def largest(key: str) -> float | None:
        shares = [r.get("compiled", {}).get(key) for r in results.get("white_dwarf", {}).values()]
        shares = [f for f in shares if f is not None]
        return max(shares) if shares else None

    driver = largest("driver_fraction")
    notes.append("time per solve outside the compiled programs (the driver's checks, bookkeeping and the field's "
                 "probe) at most 10% of a white-dwarf training step (largest share): "
                 + (f"{'met' if driver <= 0.10 else 'missed'} ({100 * driver:.1f}%)" if driver is not None
                    else "not measured"))
    outside = largest("outside_fraction")
    if outside is not None:
        notes.append(f"for scale, not a goal: outside Inductor's graphs, counting also the loss, AdamW's step and "
                     f"Dynamo's guards and dispatch of each program call (the profiler's count, which errs high): "
                     f"up to {100 * outside:.0f}%")
    if "white_dwarf_counting" in results:
        measured = [r for r in counting if r is not None]
        notes.append(verdict("a field counting its calls compiles (strict, no fall-back) and every strategy is faster "
                             "compiled (slowest speed-up >= 1)", min(measured) if len(measured) == len(counting)
                             else None, 1.0, at_least=True))
    if "cnf_dopri5" in results:  # measured against eager, no threshold set
        notes.append("adaptive solves (the CNF, dopri5), each step and each step's reverse compiled, speed-up over "
                     "eager: " + ", ".join(f"{s} {_fmt(ratio('cnf_dopri5', s), '.2f')}x" for s in STRATEGY_NAMES))
    if "memory_bound" in results:
        notes.append(
            "no row slower compiled than eager in the memory-bound case: "
            + ("met" if not slower_memory_bound else f"missed ({', '.join(slower_memory_bound)})")
        )
    else:
        notes.append("no row slower compiled than eager in the memory-bound case: not measured (not in this run)")
    if set(results) - {"diffrax"} != set(PROBLEMS) and not quick:
        notes.append(f"only these problems ran ({PROBLEMS_ENV}): {', '.join(p for p in results if p != 'diffrax')}")
    if diffrax is None:
        notes.append("diffrax rows: jax/diffrax not installed (`pip install jax diffrax`), so not measured")
    return BenchReport(
        name="compiled",
        summary=(
            "Eager against `compile=True` per strategy, each row a fresh process, one thread. The compiled "
            "programs are the whole fixed-step loops (forward and each strategy's backward) as compiled scans "
            "(docs/compile.md). Speed-up = eager s/step / compiled s/step, side by side in this run."
            + (" QUICK RUN: the aot_eager backend at N = 100, a smoke test of this harness, its rows in one "
               "process; its times are not Inductor's." if quick else "")
        ),
        tables=tables,
        data=results,
        notes=notes,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probe", nargs=5, metavar=("PROBLEM", "STRATEGY", "MODE", "STEPS", "REPEATS"))
    args = parser.parse_args(argv)
    problem, strategy, mode, steps, repeats = args.probe
    print(json.dumps(probe(problem, strategy, mode == "compiled", int(steps), int(repeats))))


if __name__ == "__main__":
    main()
