"""``bench pde``: memory and time of every exact strategy through long rollouts of the ``pde`` model.

The showcase is ``model=pde data=kdv``: Korteweg-de Vries on 64 points, a width-16 convolutional
correction to finite-difference dispersion ``-delta^2 d3_h u``, RK4 with ``dt = 0.025``, its
correction's last layer given seeded random weights (an untrained correction is zero), on a batch of
test fields in float32. KdV is dispersive and conservative: the known part's eigenvalues are purely
imaginary, where McCallum and Foster's reversible scheme with coupling 1 is neutrally stable both
forwards and in the backward rebuild, so its round-off does not grow exponentially with the steps
(on a diffusive PDE the rebuild runs the heat equation backwards: the contrast rows, on Burgers).
For each rollout length ``N`` (output at five equally spaced times) and each exact strategy it
measures, side by side in one run:

* the bytes autograd keeps for backward after the forward pass (``Solution.saved_bytes``) and the
  peak it holds during the backward pass on top (``peak_autograd_bytes``): the CPU's measure;
* the median seconds of a training step (forward and backward);
* what ``strategy=auto`` chooses under the 2 GB budget (its own probes).

From the two longest rollouts it fits bytes per step and the longest rollout each strategy keeps
under 2 GB. Reversible's gradient is exact only where its backward pass rebuilds the states it did
not keep: its rebuild error is measured against ``N`` (and coupling) on the fields the payoff's two
models learned, and the longest rollout it trains is the shorter of what its memory allows and where
its rebuild error reaches the strategy's own tolerance (the square root of float32's epsilon): the
longest measured ``N`` within it when a measured one is beyond it, else extrapolated from the two
longest measured rollouts, at least linearly in ``N``.

The 2-D case, where memory decides: the same questions on Zakharov-Kuznetsov (``data=zk``, KdV in two
dimensions) on a 64 x 64 grid, whose state is 64 times KdV's: Direct's bytes per step are measured at
a batch of 16, and Reversible's rebuild error on rollouts up to ``N = 1600`` (the same width-16
correction with 3 x 3 kernels, RK4 with ``dt = 0.0125``), on seeded random weights and on weights
trained briefly on ``data=zk``. There the longest rollout Reversible trains is the longest measured
one within the tolerance on both, never extrapolated.

The payoff: two models trained on KdV for the same wall-clock budget, one through windows of 8
observation intervals (``N = 80`` RK4 steps) with Reversible and one on windows of one interval
(``N = 10``) with Direct, scored by the relative L2 error of whole test rollouts of 40 intervals
(5x and 40x their windows).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Any

import torch

from nde_zoo.bench.autograd_memory import peak_autograd_bytes
from nde_zoo.bench.report import BenchReport, Check, Source, Table, Verdict
from nde_zoo.bench.runner import on_one_thread

__all__ = ["run", "GOALS", "kdv_data", "data_config", "exact_reach", "measured_reach"]

BUDGET = 2 * 1024**3
CAP = 10**9  # the longest rollout reported for a strategy whose bytes do not grow with N
LONGER_BAR, TIME_BAR, PAYOFF_BAR = 20.0, 3.0, 0.5
SOLVER, DT = "rk4", 0.025  # data=kdv's rollout
ZK_DT = 0.0125  # data=zk's rollout step (RK4 is stable on its 2-D dispersion up to about 0.019)
LONG_WINDOW = 8  # the payoff's long training window, in observation intervals (80 RK4 steps)
REVERSIBLE_COUPLING = 1.0  # neutral on imaginary eigenvalues: no damping forwards, no growth in the rebuild
GOALS = {
    "longer": "under the 2 GB budget, Reversible trains a rollout at least 20x longer than Direct "
              "(its memory fits and its rebuild error is within its tolerance)",
    "time": "Reversible's seconds per training step at most 3x Direct's where both fit",
    "payoff": "the long-rollout model's test error over the long horizon at most half the short-rollout model's",
}


def kdv_data(**overrides: Any) -> Any:
    """The datamodule of ``data=kdv`` (configs/data/kdv.yaml), with ``overrides``."""
    return data_config("kdv", **overrides)


def data_config(name: str, **overrides: Any) -> Any:
    """The datamodule of ``data=NAME`` (configs/data/NAME.yaml), with ``overrides``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from nde_zoo.configs_path import config_dir

    cfg = OmegaConf.load(config_dir() / "data" / f"{name}.yaml")
    return instantiate(OmegaConf.merge(cfg, overrides))


def _model(strategy: Any, seed: int = 0, scale: float = 0.05, system: str = "kdv", points: int = 64) -> Any:
    from nde_zoo.models.pde import PDEModel

    torch.manual_seed(seed)
    if system == "kdv":
        model = PDEModel(strategy, points=64, known="dispersion", dispersion=0.0225, diffusion=[0.0], width=16,
                         dt=DT, solver=SOLVER, correction="skew")
    elif system == "zk":  # data=zk's field: 2-D, one channel; 3 x 3 kernels keep the long rebuilds affordable
        model = PDEModel(strategy, dim=2, points=points, known="dispersion", dispersion=0.0225, diffusion=[0.0],
                         width=16, kernel_size=3, dt=ZK_DT, solver=SOLVER, correction="skew")
    else:  # Burgers, the diffusive contrast
        model = PDEModel(strategy, points=64, diffusion=[0.05], width=16)
    if scale:
        with torch.no_grad():
            model.field.net[-1].weight.normal_(0.0, scale)
    return model


def _strategies(steps: int) -> dict[str, Any]:
    from nde_zoo.strategies import Checkpoint, Direct, Reversible, Symplectic

    snapshots = max(2, math.ceil(math.sqrt(steps)))
    return {
        "Direct": Direct(SOLVER, steps=steps),
        "Checkpoint (sqrt N snapshots)": Checkpoint(SOLVER, steps=steps, snapshots=snapshots),
        "Symplectic": Symplectic(SOLVER, steps=steps),
        "Reversible": Reversible(SOLVER, steps=steps, coupling=REVERSIBLE_COUPLING),
    }


def _problem(batch: int) -> tuple[torch.Tensor, Any]:
    data = kdv_data()  # data=kdv: generated once, then read from the cache
    data.setup()
    return data.trajectories["test"].repeat(math.ceil(batch / len(data.trajectories["test"])), 1, 1, 1)[:batch, 0], data


def _measure(strategy: Any, u0: torch.Tensor, steps: int, dt: float, repeats: int,
             system: str = "kdv") -> dict[str, float]:
    model = _model(strategy, system=system, points=u0.shape[-1])
    params = list(model.parameters())
    ts = torch.linspace(0.0, steps * dt, 5)
    seconds, extras = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Reversible's rebuild warnings: its error is measured below
        warm = steps <= 200  # a short rollout warms up first; a long one is its own warm-up
        for r in range(repeats + (1 if warm else 0)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            ys, solution = model.rollout(u0, ts)
            ys[:, 1:].pow(2).mean().backward()
            if r or not warm:
                seconds.append(time.perf_counter() - start)
            extras = solution.extras
        model.zero_grad(set_to_none=True)
        ys, solution = model.rollout(u0, ts)
        kept = solution.saved_bytes
        peak = peak_autograd_bytes(ys[:, 1:].pow(2).mean(), kept, params)
    return {"seconds": statistics.median(seconds), "kept": float(kept), "peak": float(peak),
            "rebuild": float(extras.get("reconstruction_error", float("nan")))}


def rss_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The bench's training loss, for :func:`nde_zoo.bench.rss.training_step_rss_growth`."""
    u0, ts = batch
    return model.rollout(u0, ts)[0][:, 1:].pow(2).mean()


def _rss(u0: torch.Tensor, lengths: list[int]) -> Table:
    """Peak RSS growth of one training step in a fresh process, Direct and Reversible."""
    from nde_zoo.bench.rss import training_step_rss_growth
    from nde_zoo.strategies import Direct, Reversible

    rows = []
    for name, make in (("Direct", lambda n: Direct(SOLVER, steps=n)),
                       ("Reversible", lambda n: Reversible(SOLVER, steps=n, coupling=REVERSIBLE_COUPLING))):
        cells = []
        for n in lengths:
            growth = training_step_rss_growth(_model(make(n)), (u0, torch.linspace(0.0, n * DT, 5)),
                                              "nde_zoo.bench.pde:rss_loss")
            cells.append("n/a" if growth is None else f"{growth / 2**20:.1f}")
        rows.append([name, *cells])
    return Table("Peak RSS growth of one training step in a fresh process (MiB)",
                 ["strategy", *(f"N={n}" for n in lengths)], rows)


def _auto_choice(u0: torch.Tensor, steps: int) -> str:
    from nde_zoo.strategies import Auto

    auto = Auto(SOLVER, steps=steps, memory_budget=BUDGET)
    auto.announce = False
    model = _model(auto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = auto.measure(model.field, u0, torch.linspace(0.0, steps * DT, 5))
    return plan.choice or "none fits"


def _rebuild(u0: torch.Tensor, steps: int, coupling: float, system: str = "kdv",
             field: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """Reversible's rebuild error and forward drift over ``steps`` steps at ``coupling`` (float32), on the
    bench's random field or on ``field`` (a trained field's state dict)."""
    from nde_zoo.solvers.errors import NonFiniteStateError
    from nde_zoo.strategies import Reversible

    solver, dt = {"kdv": (SOLVER, DT), "zk": (SOLVER, ZK_DT)}.get(system, ("midpoint", 0.05))
    model = _model(Reversible(solver, steps=steps, coupling=coupling), system=system, points=u0.shape[-1])
    if field is not None:
        model.field.load_state_dict(field)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ys, solution = model.rollout(u0, torch.tensor([0.0, steps * dt]))
            ys[:, -1].pow(2).mean().backward()
        except NonFiniteStateError:  # the forward blew up: nothing to rebuild
            return float("inf"), float("inf")
    return (float(solution.extras.get("reconstruction_error", float("nan"))),
            float(solution.extras.get("drift", float("nan"))))


def _longest(points: dict[int, float], shape: str = "N") -> tuple[float, float, float]:
    """``(bytes per unit of shape, bytes at N = 0, longest N under BUDGET)`` from the two longest
    rollouts, bytes linear in ``N`` (``shape="N"``) or in ``sqrt N`` (Checkpoint with sqrt N snapshots)."""
    g = math.sqrt if shape == "sqrt N" else float
    (n1, b1), (n2, b2) = sorted(points.items())[-2:]
    slope = (b2 - b1) / (g(n2) - g(n1))
    base = b2 - slope * g(n2)
    if slope <= max(1e-6 * b2, 1.0):  # flat: bounded by something other than memory
        return slope, base, float(CAP)
    units = (BUDGET - base) / slope
    return slope, base, float(min(CAP, math.floor(units**2 if shape == "sqrt N" else units)))


def exact_reach(errors: dict[int, float], tol: float) -> tuple[float, float]:
    """``(growth exponent, longest N whose rebuild error stays within tol)`` from Reversible's rebuild
    errors measured against N: 0 when the longest measured rollout is already beyond ``tol`` (or none
    is finite), else the error extrapolated from the two longest measured rollouts as ``N^p`` with
    ``p`` their log-log slope but at least 1 (round-off adding up coherently: the cautious reading of
    a random walk's ``sqrt N``), capped at ``CAP``. A rollout past ``tol`` inside the measured range
    bounds it too."""
    measured = sorted((n, e) for n, e in errors.items() if n > 0)
    bad = [n for n, e in measured if not (math.isfinite(e) and e <= tol)]
    if not measured or len(measured) < 2 or bad and bad[0] <= measured[0][0]:
        return float("nan"), 0.0
    if bad:
        return float("nan"), float(max(n for n, _ in measured if n < bad[0]))
    (n1, e1), (n2, e2) = measured[-2:]
    p = max(1.0, math.log(max(e2, 1e-300) / max(e1, 1e-300)) / math.log(n2 / n1))
    return p, float(min(CAP, math.floor(n2 * (tol / max(e2, 1e-300)) ** (1.0 / p))))


def measured_reach(errors: dict[int, float], tol: float) -> int:
    """The longest measured ``N`` whose rebuild error, and every shorter measured rollout's, is within
    ``tol`` (0 if none): what a rollout is known to rebuild exactly, with nothing extrapolated."""
    reach = 0
    for n, error in sorted(errors.items()):
        if not (math.isfinite(error) and error <= tol):
            break
        reach = n
    return reach


def _train(model: Any, data: Any, seconds: float) -> tuple[int, float, float]:
    """AdamW (lr 1e-2) on ``data``'s training windows for ``seconds`` of wall clock: (steps, seconds, the
    largest rebuild error a reversible rollout reported on the way; NaN for other strategies)."""
    from torch.utils.data import DataLoader

    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(data.dataset("train"), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    steps, start, worst = 0, time.perf_counter(), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reversible rollout's drift or rebuild warning: logged in its extras
        while time.perf_counter() - start < seconds:
            for t, u in loader:
                optimiser.zero_grad(set_to_none=True)
                ys, solution = model.rollout(u[:, 0], t[0])
                (ys[:, 1:] - u[:, 1:]).pow(2).mean().backward()
                error = solution.extras.get("reconstruction_error")
                if error is not None:
                    worst = error if not worst >= error else worst
                optimiser.step()
                steps += 1
                if time.perf_counter() - start >= seconds:
                    break
    return steps, time.perf_counter() - start, worst


def _test_error(model: Any, data: Any) -> dict[str, float]:
    t, u = data.dataset("test")[:]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ys, _ = model.rollout(u[:, 0], t[0])
    rel = model.relative_error(ys[:, 1:], u[:, 1:])
    rel = torch.nan_to_num(rel, nan=float("inf"))
    return {"test_rel_error": float(rel.mean()), "final_rel_error": float(rel[:, -1].mean()),
            "horizon": int(u.shape[1] - 1)}


def _payoff(seconds: float, quick: bool) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """A long-window model (Reversible) and a short-window one (Direct), ``seconds`` each; their test errors
    over whole test trajectories; and the untrained model (the known dispersion alone). Also each
    model's trained field (its state dict): ``{"long": ..., "short": ...}``."""
    from nde_zoo.strategies import Direct, Reversible

    size = dict(n_train=2, n_val=1, n_test=2, n_obs=4) if quick else {}  # quick: the same code, small
    steps_per_interval = round(kdv_data().obs_dt / DT)
    out: dict[str, Any] = {}
    trained: dict[str, dict[str, torch.Tensor]] = {}
    for label, window, strategy in (
            ("long (Reversible)", 2 if quick else LONG_WINDOW,
             Reversible(SOLVER, step_size=DT, coupling=REVERSIBLE_COUPLING)),
            ("short (Direct)", 1, Direct(SOLVER, step_size=DT))):
        data = kdv_data(train_window=window, window_stride=2 if window > 1 else 1, **size)
        data.setup()
        model = _model(strategy, scale=0.0)  # the correction starts at zero: the known dispersion alone
        steps, spent, worst = _train(model, data, seconds)
        out[label] = {"window": window, "solver_steps": window * steps_per_interval, "train_steps": steps,
                      "seconds": spent, "worst_rebuild": worst, **_test_error(model, data)}
        trained[label.split()[0]] = {k: v.detach().clone() for k, v in model.field.state_dict().items()}
    data = kdv_data(**size)
    data.setup()
    out["untrained"] = {"window": 0, "solver_steps": 0, "train_steps": 0, "seconds": 0.0,
                        **_test_error(_model(Direct(SOLVER, step_size=DT), scale=0.0), data)}
    return out, trained


def run(quick: bool = False) -> BenchReport:
    return on_one_thread(_run, quick)


def _run(quick: bool) -> BenchReport:
    lengths = [4, 8, 16] if quick else [50, 200, 400]
    batch = 2 if quick else 16  # data=kdv's training batch
    repeats = 1
    u0, _ = _problem(batch)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for n in lengths:
        for name, strategy in _strategies(n).items():
            results.setdefault(name, {})[n] = _measure(strategy, u0, n, DT, repeats)
    choices = {n: _auto_choice(u0, n) for n in lengths}
    names = list(results)

    # 1. the sweep
    sweep_rows = []
    for n in lengths:
        for name in names:
            r = results[name][n]
            sweep_rows.append([name, str(n), f"{r['kept'] / 2**20:.3f}", f"{r['peak'] / 2**20:.3f}",
                               f"{r['seconds']:.4f}", f"{r['seconds'] / results['Direct'][n]['seconds']:.2f}",
                               f"{r['rebuild']:.2e}" if name == "Reversible" else ""])
    sweep = Table("Rollouts of the pde model on KdV: memory and seconds per training step against N",
                  ["strategy", "N", "kept MiB", "peak autograd MiB", "s / step", "time / Direct",
                   "Reversible's rebuild error"], sweep_rows)

    # 2. the rebuild against N and coupling; Burgers (diffusive) for contrast
    tol = math.sqrt(torch.finfo(torch.float32).eps)
    # the payoff first: its long model's trained field is the one whose rebuild decides the longest rollout
    payoff, trained = _payoff(2.0 if quick else 240.0, quick)
    long_n = 32 if quick else 1500
    c = f"{REVERSIBLE_COUPLING:g}"
    rebuild: dict[str, dict[int, tuple[float, float]]] = {
        f"KdV, trained (short), {c}": {n: _rebuild(u0, n, REVERSIBLE_COUPLING, field=trained["short"])
                                       for n in (*lengths, long_n)},
        f"KdV, trained (long), {c}": {n: _rebuild(u0, n, REVERSIBLE_COUPLING, field=trained["long"])
                                      for n in (lengths[-1], long_n)},
        "KdV, trained (short), 0.999": {lengths[-1]: _rebuild(u0, lengths[-1], 0.999, field=trained["short"])},
        f"KdV, random, {c}": {n: (results["Reversible"][n]["rebuild"], float("nan")) for n in lengths},
    }
    burgers_u0 = _burgers_fields(batch)
    burgers_ns = (8, 16) if quick else (8, 16, 32)
    rebuild["Burgers, random, 0.999"] = {n: _rebuild(burgers_u0, n, 0.999, "burgers") for n in burgers_ns}
    rebuild["Burgers, random, 0.5"] = {n: _rebuild(burgers_u0, n, 0.5, "burgers") for n in burgers_ns}
    zk = _zk_case(quick)  # the 2-D case: its rebuild rows join the table, its memory gets its own
    rebuild[f"ZK, random, {c}"] = zk["rebuild"]
    rebuild[f"ZK, trained (briefly), {c}"] = zk["rebuild_trained"]
    rebuild_rows = []
    for case, by_n in rebuild.items():
        system, field, coupling = case.split(", ")
        for n, (err, drift) in sorted(by_n.items()):
            rebuild_rows.append([system, field, coupling, str(n), f"{err:.2e}",
                                 "" if math.isnan(drift) else f"{drift:.2e}", "yes" if err <= tol else "no"])
    rebuild_table = Table(f"Reversible's rebuild: relative error of y0 rebuilt by its backward pass (float32, "
                          f"tolerance {tol:.1e}) and forward drift of its coupled states",
                          ["system", "field", "coupling", "N", "rebuild error", "drift", "within tolerance"],
                          rebuild_rows)
    reaches = {which: exact_reach({n: e for n, (e, _) in rebuild[f"KdV, trained ({which}), {c}"].items()}, tol)
               for which in ("short", "long")}
    reach_of = min(reaches, key=lambda which: reaches[which][1])  # the more cautious of the two trained fields
    growth, reach = reaches[reach_of]

    # 3. the longest rollout under the budget
    longest = {}
    for name in names:
        shape = "sqrt N" if name.startswith("Checkpoint") else "N"
        slope, base, n_max = _longest({n: results[name][n]["peak"] for n in lengths}, shape)
        longest[name] = {"shape": shape, "bytes_per_unit": slope, "base": base, "memory_longest": n_max}
    longest_rows = []
    for name in names:
        info = longest[name]
        trains = min(info["memory_longest"], reach) if name == "Reversible" else info["memory_longest"]
        info["trains"] = trains
        longest_rows.append([name, f"{info['bytes_per_unit'] / 1024:.2f} per {info['shape']}",
                             f"{info['memory_longest']:.4g}",
                             f"{reach:.4g}" if name == "Reversible" else "exact", f"{trains:.4g}"])
    longest_table = Table("Longest rollout under a 2 GB budget, from the measured bytes per step",
                          ["strategy", "peak KiB growth", "longest N (memory)", "exact up to N",
                           "longest N it trains"], longest_rows)

    # 4. auto's choice
    auto_table = Table("What strategy=auto chooses under the 2 GB budget",
                       ["N", "choice"], [[str(n), choices[n]] for n in lengths])

    # 5. the payoff
    payoff_rows = [[label, str(p["window"]), str(p["solver_steps"]), str(p["train_steps"]), f"{p['seconds']:.1f}",
                    f"{p['test_rel_error']:.4f}", f"{p['final_rel_error']:.4f}",
                    "" if math.isnan(p.get("worst_rebuild", float("nan"))) else f"{p['worst_rebuild']:.1e}"]
                   for label, p in payoff.items()]
    horizon = payoff["untrained"]["horizon"]
    payoff_table = Table(f"Payoff on KdV: the same wall-clock budget, test error over {horizon} intervals",
                         ["model", "window (intervals)", "RK4 steps per window", "training steps", "seconds",
                          "mean relative L2 error", "at the horizon's end", "largest rebuild error in training"],
                         payoff_rows)

    # 6. the 2-D case: Direct's bytes per step against the rollout Reversible rebuilds exactly
    zk_reaches = {field: measured_reach({n: e for n, (e, _) in zk[key].items()}, tol)
                  for field, key in (("random", "rebuild"), ("trained", "rebuild_trained"))}
    zk_exact = min(zk_reaches.values())  # the more cautious field, as on KdV
    zk_rows = []
    for name in ("Direct", "Reversible"):
        slope, base, n_max = _longest(zk["peak"][name])
        trains = min(n_max, zk_exact) if name == "Reversible" else n_max
        zk["longest"][name] = {"bytes_per_step": slope, "memory_longest": n_max, "trains": trains}
        zk_rows.append([name, *(f"{zk['peak'][name][n] / 2**20:.1f}" for n in zk["lengths"]),
                        f"{slope / 2**20:.2f}", f"{n_max:.4g}", f"{zk_exact}" if name == "Reversible" else "exact",
                        f"{trains:.4g}"])
    zk_table = Table(f"The 2-D case: ZK on {zk['points']} x {zk['points']}, batch {zk['batch']}, longest rollout "
                     f"under a 2 GB budget",
                     ["strategy", *(f"peak autograd MiB, N={n}" for n in zk["lengths"]), "MiB per step",
                      "longest N (memory)", "exact up to N (measured)", "longest N it trains"], zk_rows)

    tables = [sweep, rebuild_table, longest_table, auto_table, payoff_table, zk_table]
    if not quick:  # a fresh process per figure: only in the full run
        tables.append(_rss(u0, [lengths[0], lengths[-1]]))

    both_fit = [n for n in lengths if longest["Direct"]["memory_longest"] >= n]
    n_time = max(both_fit) if both_fit else lengths[-1]
    time_ratio = results["Reversible"][n_time]["seconds"] / results["Direct"][n_time]["seconds"]
    long_label, short_label = "long (Reversible)", "short (Direct)"
    verdicts = [
        Verdict("longer", "KdV, 2 GB budget", (Check(
            "Reversible's longest trained N / Direct's", longest["Reversible"]["trains"] / longest["Direct"]["trains"],
            ">=", LONGER_BAR, Source(2, ("Reversible", "Direct"), ("longest N it trains",), "ratio"),
            fmt=".3g", unit="x"),)),
        Verdict("longer", f"ZK 2-D ({zk['points']} x {zk['points']}, batch {zk['batch']}), 2 GB budget", (Check(
            "Reversible's longest trained N / Direct's",
            zk["longest"]["Reversible"]["trains"] / max(zk["longest"]["Direct"]["trains"], 1),
            ">=", LONGER_BAR, Source(5, ("Reversible", "Direct"), ("longest N it trains",), "ratio"),
            fmt=".3g", unit="x"),)),
        Verdict("time", f"KdV, N={n_time}", (Check(
            "Reversible s / step / Direct's", time_ratio, "<=", TIME_BAR,
            Source(0, (("Reversible", str(n_time)),), ("time / Direct",), "value"), unit="x"),)),
        Verdict("payoff", f"KdV, {horizon} intervals", (Check(
            "long-window error / short-window error",
            payoff[long_label]["test_rel_error"] / payoff[short_label]["test_rel_error"],
            "<=", PAYOFF_BAR, Source(4, (long_label, short_label), ("mean relative L2 error",), "ratio"), unit="x"),)),
    ]
    fastest_fit = {n: min((name for name in names if longest[name]["trains"] >= n),
                          key=lambda name: results[name][n]["seconds"], default="none") for n in lengths}
    measured_max = long_n
    ratio = longest["Reversible"]["trains"] / longest["Direct"]["trains"]
    batch_for_bar = math.ceil(batch * LONGER_BAR / ratio) if ratio > 0 else float("inf")
    notes = [
        f"Reversible runs at coupling {REVERSIBLE_COUPLING:g}: on KdV's imaginary eigenvalues the coupled scheme is "
        "then neutral, so neither its forward nor its rebuild amplifies round-off exponentially. At 0.999 the "
        "rebuild divides by 0.999 at every step (see the rebuild table). On Burgers' diffusion no coupling rebuilds "
        "beyond a few steps: the contrast rows.",
        f"Reversible's 'exact up to N' is measured on the fields the payoff's two models learned (KdV, trained), up "
        f"to N = {measured_max} (the rebuild table); the more cautious of the two is used: the {reach_of}-window "
        "model's. " + (
            f"A measured rollout left the tolerance, so it is the longest measured N within it ({reach:.0f}): the "
            "rebuild error grows with the learned dynamics' sensitivity to round-off, faster than any power of N."
            if math.isnan(growth) else
            f"Beyond the measured N it is extrapolated from the two longest rollouts, the error growing as "
            f"N^{growth:.2f} (the fitted exponent, at least 1): the verdict rests on that extrapolation as Direct's "
            "rests on its bytes' linear fit.") + " KdV's 'random' rows are the sweep's field (a random skew "
        "correction).",
        f"Direct's longest rollout shrinks as the batch grows and Reversible's does not (its memory is flat, its "
        f"rebuild error per trajectory): at this batch of {batch} the ratio is {ratio:.3g}x; it would reach "
        f"{LONGER_BAR:g}x from a batch of about {batch_for_bar} fields of 64 points (extrapolated, not run).",
        "Exact for the same discretisation: Direct, Checkpoint and Symplectic backprop the plain RK4 rollout; "
        "Reversible its own coupled scheme (tests/test_pde.py checks each against backprop in float64).",
        "Fastest strategy that trains each N (measured): " + ", ".join(f"N={n}: {fastest_fit[n]}" for n in lengths) + ".",
        "The payoff's models start from the known dispersion alone (the correction's last layer at zero: the "
        "'untrained' row) and learn the rest, advection included; AdamW, lr 1e-2, batch 16.",
        f"The 2-D case (ZK): a state of {zk['points']}^2 points is {zk['points'] ** 2 / 64:g} times KdV's 64, so "
        f"Direct keeps {zk['longest']['Direct']['bytes_per_step'] / 2**20:.0f} MiB per RK4 step at a batch of "
        f"{zk['batch']} and fits {zk['longest']['Direct']['memory_longest']:.0f} steps in 2 GB (the linear fit of its "
        f"peak at N = {', '.join(map(str, zk['lengths']))}, where Reversible's peak did not grow). Reversible's "
        f"'exact up to N' is the longest measured rollout whose rebuild stays within float32's tolerance on both "
        f"ZK fields, the random skew correction ({zk_reaches['random']}) and one trained briefly "
        f"({zk_reaches['trained']}; {zk['training']['updates']} updates in {zk['training']['seconds']:.0f} s "
        f"took its test error over the 20-interval horizon from {zk['training']['untrained_error']:.3f} to "
        f"{zk['training']['test_error']:.3f}): N = {zk_exact}, a lower bound, nothing extrapolated. The rebuild "
        f"is measured on {zk['rebuild_batch']} of the {zk['batch']} fields, a sample (its error is the largest "
        "over the fields rebuilt).",
        "CPU figures (this machine); no GPU row was run.",
    ]
    summary = (
        f"The pde model on KdV (data=kdv: 64 points, a width-16 convolutional correction to finite-difference "
        f"dispersion, RK4, dt = {DT}) on a batch of {batch} test fields, float32, one thread; rollouts of N = "
        f"{', '.join(map(str, lengths))} steps observed at five times. 'kept' is what autograd keeps after the forward "
        "pass, 'peak autograd' adds the most the backward pass holds on top (median of one timed step; a rollout "
        "of at most 200 steps is run once before, to warm up). The peak's growth and the longest N under 2 GB are "
        "fitted from the two longest rollouts, linear in N (in sqrt N for Checkpoint with sqrt N snapshots; a flat "
        "line is reported as 1e9, the cap). Reversible trains a rollout only where its rebuild error is within "
        f"float32's tolerance. The 2-D case: Direct's and Reversible's peaks on ZK (data=zk's {zk['points']} x "
        f"{zk['points']} fields, a batch of {zk['batch']}, 3 x 3 kernels, RK4, dt = {ZK_DT}) at two short rollouts, "
        f"and Reversible's rebuild on two fields up to N = {max(zk['rebuild'])}, on a random and a briefly trained "
        "correction. The payoff trains two models for the same wall-clock seconds. "
        f"Goals: {GOALS['longer']}; {GOALS['time']}; {GOALS['payoff']}."
    )
    return BenchReport(
        name="pde", summary=summary,
        tables=tables,
        data={"sweep": {k: {str(n): v for n, v in d.items()} for k, d in results.items()},
              "rebuild": {c: {str(n): v for n, v in d.items()} for c, d in rebuild.items()},
              "exact_reach": {"growth_exponent": growth, "reach": reach, "measured_up_to": measured_max,
                              "field": reach_of, "by_field": reaches, "batch_for_bar": batch_for_bar},
              "longest": longest, "auto": {str(n): c for n, c in choices.items()}, "payoff": payoff,
              "zk": {"peak": {k: {str(n): b for n, b in v.items()} for k, v in zk["peak"].items()},
                     "rebuild": {str(n): v for n, v in zk["rebuild"].items()}, "exact_up_to": zk_exact,
                     "rebuild_trained": {str(n): v for n, v in zk["rebuild_trained"].items()},
                     "reach_by_field": zk_reaches, "training": zk["training"],
                     "longest": zk["longest"], "points": zk["points"], "batch": zk["batch"]},
              "budget_bytes": BUDGET},
        notes=notes, verdicts=verdicts,
    )


def _zk_case(quick: bool) -> dict[str, Any]:
    """The 2-D case: Direct's and Reversible's peak autograd bytes on ZK fields (a batch of 16 on 64 x 64;
    quick: 2 on 16 x 16) at two short rollouts; Reversible's rebuild error and drift at long ones on two of
    the fields (a sample: the error is per trajectory), with data=zk's initial conditions, on the random
    skew correction of :func:`_model` and on one trained briefly on data=zk (Direct, one-interval windows,
    AdamW as the payoff's) from the known dispersion alone."""
    from nde_zoo.strategies import Direct, Reversible

    points, batch, lengths, long_ns = (16, 2, (2, 4), (8, 16)) if quick else (64, 16, (4, 8), (200, 800, 1600))
    data = data_config("zk", points=points, cache_dir="off")
    u0 = data.initial_conditions(batch, torch.Generator().manual_seed(2), fine=False).to(torch.float32)
    peak = {"Direct": {}, "Reversible": {}}
    for n in lengths:
        for name, strategy in (("Direct", Direct(SOLVER, steps=n)),
                               ("Reversible", Reversible(SOLVER, steps=n, coupling=REVERSIBLE_COUPLING))):
            peak[name][n] = _measure(strategy, u0, n, ZK_DT, 1, system="zk")["peak"]
    rebuild = {n: _rebuild(u0[:2], n, REVERSIBLE_COUPLING, system="zk") for n in long_ns}
    size = dict(points=16, n_train=2, n_val=1, n_test=1, n_obs=2, cache_dir="off") if quick else {}
    train_data = data_config("zk", train_window=1, **size)
    train_data.setup()
    model = _model(Direct(SOLVER, step_size=ZK_DT), scale=0.0, system="zk", points=points)
    untrained = _test_error(model, train_data)["test_rel_error"]
    updates, spent, _ = _train(model, train_data, 2.0 if quick else 150.0)
    trained = {k: v.detach().clone() for k, v in model.field.state_dict().items()}
    rebuild_trained = {n: _rebuild(u0[:2], n, REVERSIBLE_COUPLING, system="zk", field=trained) for n in long_ns[-2:]}
    return {"points": points, "batch": batch, "lengths": lengths, "peak": peak, "rebuild": rebuild,
            "rebuild_trained": rebuild_trained, "rebuild_batch": min(2, batch), "longest": {},
            "training": {"updates": updates, "seconds": spent, "untrained_error": untrained,
                         "test_error": _test_error(model, train_data)["test_rel_error"]}}


def _burgers_fields(batch: int) -> torch.Tensor:
    from nde_zoo.datamodules.pde import PDEDataModule

    data = PDEDataModule()  # data=burgers' defaults: generated once, then read from the cache
    data.setup()
    return data.trajectories["test"][:min(batch, 4), 0]
