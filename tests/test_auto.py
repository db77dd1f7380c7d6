"""strategy=auto: the fastest exact strategy whose measured memory fits a budget.

The predictions are checked against full measurements, the choices against the budget, the
gradients against the chosen strategy's own (float64), and the choice against probing again
(new shapes), resuming, loading a checkpoint and DDP ranks.
"""

from __future__ import annotations

import re
import socket

import lightning
import pytest
import torch
from torch import nn

from nde_zoo.strategies import Auto, Checkpoint, Direct, MemoryBudgetError, Reversible, Symplectic
from nde_zoo.driver.autograd import NonDeterministicFieldError
from nde_zoo.strategies.auto import _measure, format_bytes, parse_bytes
from nde_zoo.strategies.checkpoint import binomial_peak_states, binomial_recomputations
from tests.ddp_harness import exit_now

TS = torch.tensor([0.0, 1.0], dtype=torch.float64)


class Field(nn.Module):
    def __init__(self, dim: int = 2, width: int = 64) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim + 1, width), nn.Linear(width, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([t.expand(y.shape[0], 1), y], dim=-1))))


def _problem(batch: int = 64, width: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    return Field(2, width).double(), torch.randn(batch, 2, dtype=torch.float64)


def _peaks(steps: int = 24, **kwargs):
    field, y0 = _problem()
    plan = Auto("rk4", steps=steps, memory_budget="100GB", **kwargs).measure(field, y0, TS)
    return field, y0, plan, {r.label: r.peak_bytes for r in plan.rows}


def _grads(strategy, field, y0):
    y0 = y0.clone().requires_grad_()
    sol = strategy.solve(field, y0, TS)
    params = list(field.parameters())
    return torch.autograd.grad((sol.ys[-1] ** 2).sum(), [y0, *params])


# -- sizes ---------------------------------------------------------------------------------------
def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes(" 64 kB ") == 64_000
    assert parse_bytes(4096) == 4096 and parse_bytes(None) is None
    for bad in ("2 gigs", "-1GB", "GB", 0, True):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_bytes(bad)
    assert format_bytes(2.5e9) == "2.50 GB" and format_bytes(12) == "12 B"


def test_unknown_candidate_is_named():
    with pytest.raises(ValueError, match=r"unknown candidate\(s\) adjoint.*direct, checkpoint, symplectic"):
        Auto("rk4", steps=4, candidates=("direct", "adjoint"))
    with pytest.raises(ValueError, match=r"probe_steps must be an integer >= 2, got 1"):
        Auto("rk4", steps=4, probe_steps=1)


# -- the model of each candidate's memory in N ---------------------------------------------------
@pytest.mark.parametrize("stepping", [{"steps": 40}, {"rtol": 1e-7, "atol": 1e-9}], ids=["fixed", "adaptive"])
def test_extrapolated_peak_matches_a_full_measurement(stepping):
    """Probed on 4 and 8 steps, each candidate's peak at the full N is what a full solve measures."""
    field, y0 = _problem(batch=32)
    ts = torch.tensor([0.0, 6.0], dtype=torch.float64)
    auto = Auto("dopri5", **stepping, memory_budget="100GB")
    plan = auto.measure(field, y0, ts)
    assert plan.estimated == ("rtol" in stepping) and plan.steps >= 12  # well beyond the 8-step probe
    for row in plan.rows:
        full = _measure(auto._build(row.label, row.snapshots), field, y0, ts, repeats=0)
        # adaptive: N is an estimate (Reversible's own error estimate may take other steps)
        assert full.steps == pytest.approx(plan.steps, rel=0.0 if "steps" in stepping else 0.1)
        assert row.peak_bytes == pytest.approx(full.peak, rel=0.05 if "steps" in stepping else 0.1), row.label
    if "rtol" in stepping:
        assert "estimated from one gradient-free adaptive solve" in plan.markdown()


def test_checkpoint_snapshots_the_fastest_count_that_fits_and_its_peak_is_measured():
    field, y0, _, peaks = _peaks(candidates=("checkpoint",))
    one = _measure(Checkpoint("rk4", steps=24, snapshots=1, schedule="binomial"), field, y0, TS, repeats=0).peak
    budget = int((one + peaks["checkpoint"]) / 2)  # every step start does not fit: fewer snapshots must
    auto = Auto("rk4", steps=24, memory_budget=budget, candidates=("checkpoint",))
    plan = auto.measure(field, y0, TS)
    row = plan.rows[0]
    assert plan.choice == "checkpoint" and row.snapshots is not None and 1 <= row.snapshots < 24
    full = _measure(Checkpoint("rk4", steps=24, snapshots=row.snapshots, schedule="binomial"), field, y0, TS, repeats=0)
    assert full.peak <= budget and row.peak_bytes == pytest.approx(full.peak, rel=0.05)
    assert row.snapshots >= 2
    # in hindsight: no snapshot count whose measured peak fits recomputes fewer steps
    fits = [c for c in range(1, 25)
            if _measure(Checkpoint("rk4", steps=24, snapshots=c, schedule="binomial"), field, y0, TS, repeats=0).peak <= budget]
    assert binomial_recomputations(24, row.snapshots) == min(binomial_recomputations(24, c) for c in fits)


@pytest.mark.parametrize("steps, snapshots", [(1, 1), (7, 1), (13, 2), (24, 12), (24, 13), (30, 3), (64, 4), (64, None)])
def test_binomial_walk_counts_what_the_reversal_does(steps, snapshots):
    field, y0 = _problem(batch=2, width=4)
    strategy = Checkpoint("rk4", steps=steps, snapshots=snapshots, schedule="binomial")
    sol = strategy.solve(field, y0.clone().requires_grad_(), TS)
    stored_bytes = sol.saved_bytes
    sol.ys.sum().backward()
    assert sol.stats.recomputed_steps == binomial_recomputations(steps, snapshots)
    state_bytes = y0.nelement() * y0.element_size()
    assert (stored_bytes + sol.stats.held_bytes) // state_bytes == binomial_peak_states(steps, snapshots)


# -- choosing ------------------------------------------------------------------------------------
def _timed(monkeypatch, per_step: dict[str, float]):
    """Probes measure the real memory but report the given seconds per step for each strategy
    class (forward only), so a choice that turns on time is decided by these figures, not by
    the machine's noise."""
    from nde_zoo.strategies import auto as auto_module

    measure = auto_module._measure

    def fake(strategy, field, y0, ts, repeats=3, memory=True):
        probe = measure(strategy, field, y0, ts, repeats=0, memory=memory)
        probe.forward, probe.backward = per_step[type(strategy).__name__] * probe.steps, 0.0
        return probe

    monkeypatch.setattr(auto_module, "_measure", fake)


def test_a_budget_above_directs_peak_chooses_direct(monkeypatch):
    """Direct fits and is the fastest by more than the tie margin (its seconds are set: on a
    loaded machine a lower-memory candidate may measure within 10% of it, and then wins the tie)."""
    field, y0, _, peaks = _peaks()
    _timed(monkeypatch, {"Direct": 1.0e-3, "Checkpoint": 1.3e-3, "Symplectic": 1.5e-3, "Reversible": 2.0e-3})
    auto = Auto("rk4", steps=24, memory_budget=int(peaks["direct"] * 1.5))
    sol = auto.solve(field, y0, TS)
    assert isinstance(auto.chosen, Direct) and auto.plan.choice == "direct"
    assert torch.equal(sol.ys, Direct("rk4", steps=24).solve(field, y0, TS).ys)
    assert "**chosen**" in auto.plan.markdown() and "| direct |" in auto.plan.markdown()


def test_within_the_margin_the_candidate_keeping_fewer_states_wins(monkeypatch, caplog):
    """Direct is fastest by 5% and keeps every stage's graph; Symplectic keeps N states: the tie
    goes to Symplectic, and the table and the log say so. Checkpoint (every step start) is within
    10% of Direct too but keeps more than Symplectic; nothing beyond the margin is tied."""
    field, y0, _, peaks = _peaks()
    assert peaks["symplectic"] < peaks["checkpoint"] < peaks["direct"]
    assert peaks["symplectic"] < peaks["reversible"]
    _timed(monkeypatch, {"Direct": 1.0e-3, "Checkpoint": 1.08e-3, "Symplectic": 1.05e-3,
                         "Reversible": 1.5e-3})
    auto = Auto("rk4", steps=24, memory_budget="100GB")
    with caplog.at_level("INFO", logger="nde_zoo"):
        got = _grads(auto, field, y0)
    plan = auto.plan
    assert plan.choice == "symplectic" and isinstance(auto.chosen, Symplectic), plan.markdown()
    assert plan.tie.startswith(
        "tie broken: direct was faster, 0.001 against 0.00105 s per step, within the 10% margin")
    assert f"{format_bytes(peaks['symplectic'])} against {format_bytes(peaks['direct'])}" in plan.tie
    assert f"choice: symplectic ({plan.tie})" in plan.markdown()
    assert any("tie broken" in r.getMessage() for r in caplog.records)
    want = _grads(Symplectic("rk4", steps=24), field, y0)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    # the same figures again choose the same, and the tie is kept in the checkpointed plan
    again = Auto("rk4", steps=24, memory_budget="100GB")
    again.solve(field, y0, TS)
    assert again.plan.choice == "symplectic"
    restored = Auto("rk4", steps=24, memory_budget="100GB")
    restored.load_state_dict(auto.state_dict())
    assert restored.plan.tie == plan.tie


def test_a_candidate_faster_by_more_than_the_margin_still_wins(monkeypatch):
    """Direct 12% faster than the lower-memory Symplectic is no tie: the fastest wins, as before."""
    field, y0, _, peaks = _peaks(candidates=("direct", "symplectic"))
    assert peaks["symplectic"] < peaks["direct"]
    _timed(monkeypatch, {"Direct": 1.0e-3, "Symplectic": 1.12e-3})
    auto = Auto("rk4", steps=24, memory_budget="100GB", candidates=("direct", "symplectic"))
    auto.solve(field, y0, TS)
    assert auto.plan.choice == "direct" and isinstance(auto.chosen, Direct), auto.plan.markdown()
    assert auto.plan.tie == "" and "tie broken" not in auto.plan.markdown()
    # and when the lower-memory candidate is the faster one, it wins without a tie to break
    _timed(monkeypatch, {"Direct": 1.05e-3, "Symplectic": 1.0e-3})
    auto = Auto("rk4", steps=24, memory_budget="100GB", candidates=("direct", "symplectic"))
    plan = auto.measure(field, y0, TS)
    assert plan.choice == "symplectic" and plan.tie == ""


def test_a_tie_never_chooses_a_candidate_that_does_not_fit():
    from nde_zoo.strategies.auto import Row, choose

    rows = [Row("direct", 3e6, 1.0, True), Row("symplectic", 1e5, 1.02, False),
            Row("checkpoint", 2e5, 1.09, True), Row("reversible", 1.5e5, 1.2, True)]
    best, tie = choose(rows, steps=10)
    assert best.label == "checkpoint" and "direct was faster, 0.1 against 0.109 s per step" in tie
    assert choose([Row("direct", 3e6, 1.0, False)]) == (None, "")


def test_a_budget_below_directs_peak_chooses_a_lower_memory_exact_strategy_with_directs_gradient():
    field, y0, _, peaks = _peaks()
    smallest = min(peaks.values())
    assert smallest < peaks["direct"] / 3
    budget = int((smallest * peaks["direct"]) ** 0.5)
    auto = Auto("rk4", steps=24, memory_budget=budget, candidates=("direct", "checkpoint", "symplectic"))
    got = _grads(auto, field, y0)
    assert isinstance(auto.chosen, (Checkpoint, Symplectic)), auto.plan.markdown()
    assert auto.plan.chosen_row.peak_bytes <= budget
    want = _grads(Direct("rk4", steps=24), field, y0)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_reversible_when_only_it_fits_and_gradients_are_its_own():
    field, y0, _, peaks = _peaks(candidates=("direct", "reversible"))
    budget = int(peaks["reversible"] * 1.2)
    assert budget < peaks["direct"]
    auto = Auto("rk4", steps=24, memory_budget=budget, candidates=("direct", "reversible"))
    got = _grads(auto, field, y0)
    assert isinstance(auto.chosen, Reversible)
    want = _grads(Reversible("rk4", steps=24), field, y0)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_a_budget_below_every_candidate_raises_naming_the_smallest_peak():
    field, y0, _, peaks = _peaks()
    smallest = min(peaks, key=peaks.get)
    auto = Auto("rk4", steps=24, memory_budget=int(peaks[smallest] / 2))
    with pytest.raises(MemoryBudgetError) as info:
        auto.solve(field, y0, TS)
    message = str(info.value)
    assert f"smallest predicted peak is {smallest}'s {format_bytes(peaks[smallest])}" in message
    assert re.search(r"strategy\.memory_budget=\d+MB", message)
    assert "smaller batch" in message and "| fits? |" in message
    assert info.value.plan.choice is None and auto.chosen is None


def test_new_shapes_or_steps_probe_again_known_ones_do_not():
    field, y0 = _problem()
    auto = Auto("rk4", steps=12, memory_budget="10GB", candidates=("direct", "reversible"))
    auto.solve(field, y0, TS)
    auto.solve(field, y0, TS)
    assert auto.probes == 1
    auto.solve(field, y0[:16], TS)  # another batch shape
    assert auto.probes == 2 and len(auto.plans) == 2
    auto.solve(field, y0, TS)  # the first shape again: its plan is kept
    assert auto.probes == 2
    with torch.no_grad():  # gradient-free solves never probe
        auto.solve(field, y0[:8], TS)
    assert auto.probes == 2


def test_compiled_variants_are_candidates(monkeypatch):
    monkeypatch.setenv("NDE_ZOO_COMPILE_BACKEND", "aot_eager")
    field, y0 = _problem(batch=8, width=8)
    plan = Auto("rk4", steps=8, compile=True, candidates=("direct", "reversible")).measure(field, y0, TS)
    assert [r.label for r in plan.rows] == ["direct", "reversible", "direct+compile", "reversible+compile"]
    assert all(r.fits and r.seconds > 0 for r in plan.rows)


# -- Lightning: logging, resume, checkpoints ------------------------------------------------------
class _Regression(lightning.LightningModule):
    def __init__(self, strategy) -> None:
        super().__init__()
        self.strategy = strategy
        self.field = Field(2, 16)

    def configure_callbacks(self):
        return [self.strategy]

    def training_step(self, batch, batch_idx):
        (y0,) = batch
        ys = self.strategy.solve(self.field, y0, TS.float()).ys
        return (ys[-1] - 0.5 * y0).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _fit(tmp_path, strategy, max_epochs, ckpt_path=None):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    model = _Regression(strategy)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer, model


def test_resume_keeps_the_choice_without_probing(tmp_path):
    first = Auto("rk4", steps=8, memory_budget="10GB", candidates=("symplectic", "reversible"))
    trainer, _ = _fit(tmp_path, first, max_epochs=1)
    assert first.probes == 1
    ckpt = trainer.checkpoint_callback.best_model_path
    again = Auto("rk4", steps=8, memory_budget="10GB", candidates=("symplectic", "reversible"))
    _fit(tmp_path, again, max_epochs=2, ckpt_path=ckpt)
    assert again.probes == 0 and again.plan.choice == first.plan.choice
    assert type(again.chosen) is type(first.chosen)


def test_a_resume_says_which_choice_it_restored(tmp_path, caplog):
    first = Auto("rk4", steps=8, memory_budget="10GB", candidates=("symplectic", "reversible"))
    trainer, _ = _fit(tmp_path, first, max_epochs=1)
    again = Auto("rk4", steps=8, memory_budget="10GB", candidates=("symplectic", "reversible"))
    with caplog.at_level("INFO", logger="nde_zoo"):
        resumed, _ = _fit(tmp_path, again, max_epochs=2, ckpt_path=trainer.checkpoint_callback.best_model_path)
    restored = [r.getMessage() for r in caplog.records if "restored the choice" in r.getMessage()]
    assert len(restored) == 1 and first.plan.choice in restored[0], restored
    assert again.probes == 0 and "auto/choice" in resumed.callback_metrics


def test_the_choice_is_logged_once(tmp_path):
    """``auto/choice`` reaches the logger at the step that chose, and at no later step (a value
    given to ``self.log`` in one step was logged again at every step after it)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from nde_zoo.strategies.auto import CHOICE_CODES

    auto = Auto("rk4", steps=8, memory_budget="10GB", candidates=("reversible",))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=16)
    logger = CSVLogger(str(tmp_path), name="logs")
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=1, logger=logger, log_every_n_steps=1,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(_Regression(auto), loader)
    assert auto.plan.choice == "reversible"
    assert trainer.callback_metrics["auto/choice"] == CHOICE_CODES["reversible"] == 3
    assert trainer.callback_metrics["memory/saved_bytes"] > 0  # the chosen strategy's solves are recorded
    with open(logger.log_dir + "/metrics.csv") as table:
        rows = list(csv.DictReader(table))
    choices = [(r["step"], r["auto/choice"]) for r in rows if r.get("auto/choice")]
    assert choices == [("0", "3.0")], choices  # once, at the first step
    assert len({r["step"] for r in rows if r.get("nfe/forward")}) == 4  # while the step figures go on


def test_a_models_checkpoint_brings_the_choice(tmp_path):
    from nde_zoo.models import ODEClassifier

    auto = Auto("rk4", steps=4, memory_budget="10GB", candidates=("direct", "reversible"))
    model = ODEClassifier(strategy=auto, state_dim=4, width=8)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer.fit(model, loader)
    path = tmp_path / "auto.ckpt"
    trainer.save_checkpoint(path)
    loaded = ODEClassifier.load_from_checkpoint(path)
    assert isinstance(loaded.strategy, Auto) and loaded.strategy.plan.choice == auto.plan.choice
    loaded.strategy.solve(loaded.field, torch.randn(16, 4), TS.float())  # the same key: no probing
    assert loaded.strategy.probes == 0


# -- DDP: rank 0 decides --------------------------------------------------------------------------
def _ddp_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        field, y0 = _problem()
        # rank 1 alone would choose another strategy: its budget is below Direct's peak
        budget = "100GB" if rank == 0 else "1MB"
        auto = Auto("rk4", steps=24, memory_budget=budget, candidates=("direct", "symplectic"))
        auto.solve(field, y0, TS)
        first = {"choice": auto.plan.choice, "budget": auto.plan.budget}
        # a batch only rank 1 has not seen: both ranks must decide together (no rank may wait alone)
        auto.solve(field, y0 if rank == 0 else y0[:16], TS)
        torch.save({**first, "probes": auto.probes, "second": auto.plan.choice}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_rank_failing(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        field, y0 = _problem()
        if rank == 0:  # only rank 0's field is broken: rank 1 must hear of it, not wait
            field.forward = lambda t, y: y.reshape(-1)
        try:
            Auto("rk4", steps=8, memory_budget="1GB", candidates=("direct",)).solve(field, y0, TS)
        except Exception as exc:  # noqa: BLE001 (what each rank raised is the result)
            torch.save(f"{type(exc).__name__}: {exc}", f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_rank_announcing(rank: int, port: int, auto: Auto) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        field, y0 = _problem(batch=8, width=8)
        auto.solve(field, y0, TS)
    finally:
        dist.destroy_process_group()


def _ddp_scenarios(rank: int, ports: list[int], auto: Auto, out: str) -> None:
    """Each rank runs the three DDP scenarios in turn, each in a process group of its own: one spawn
    (the 2 x 5-8 s of imports a spawned process pays) instead of three. The announcing one runs first,
    while nothing in the process has logged yet (a spawned process starts with no logging configured)."""
    _ddp_rank_announcing(rank, ports[0], auto)
    _ddp_rank(rank, ports[1], f"{out}/choose")
    _ddp_rank_failing(rank, ports[2], f"{out}/failing")
    exit_now()  # everything is saved: skip the interpreter's teardown (2 s)


@pytest.fixture(scope="module")
def ddp_scenarios(tmp_path_factory):
    """Spawn two processes once (``torch.multiprocessing.spawn``, as ``ddp_spawn`` does) for the three DDP
    tests below; returns ``(out, logged, stdout)``: the folder of the ranks' results, the launching
    process's log file and what reached its console (its ``sys.stdout`` and file descriptor 1, which the
    spawned processes inherit, captured as ``capfd`` would)."""
    import logging
    import os
    import sys
    import tempfile

    out = tmp_path_factory.mktemp("auto_ddp")
    for sub in ("choose", "failing"):
        (out / sub).mkdir()
    sockets = [socket.socket() for _ in range(3)]  # three distinct free ports
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    root = logging.getLogger()
    level = root.level
    sys.stdout.flush()
    with tempfile.TemporaryFile("w+") as console:
        saved_fd, saved_stdout = os.dup(1), sys.stdout
        os.dup2(console.fileno(), 1)
        sys.stdout = console
        handlers = [logging.FileHandler(out / "cli.log"), logging.StreamHandler(sys.stdout)]
        try:
            for handler in handlers:
                handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
                root.addHandler(handler)
            root.setLevel(logging.INFO)
            auto = Auto("rk4", steps=4, memory_budget="1GB", candidates=("direct", "reversible"))
            torch.multiprocessing.spawn(_ddp_scenarios, args=(ports, auto, str(out)), nprocs=2, join=True)
        finally:
            for handler in handlers:
                root.removeHandler(handler)
                handler.close()
            root.setLevel(level)
            console.flush()
            sys.stdout = saved_stdout
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
        console.seek(0)
        printed = console.read()
    return out, (out / "cli.log").read_text(), printed


def test_ddp_spawn_logs_the_table_once_where_the_launching_process_logs(ddp_scenarios):
    """Processes spawned for DDP (``ddp_spawn``) start with no logging configured; the table still
    reaches the launching process's console and log file (the CLI's ``cli.log``), from rank 0 only."""
    _, logged, printed = ddp_scenarios
    assert logged.count("strategy=auto for Field with a 8x2 float64 state") == 1, logged
    assert "[nde_zoo][INFO] - strategy=auto for" in logged and "| candidate | peak memory |" in logged
    assert printed.count("strategy=auto for Field") == 1


def test_ddp_a_probe_that_fails_on_rank_0_fails_every_rank(ddp_scenarios):
    out = ddp_scenarios[0] / "failing"
    assert "shape" in torch.load(out / "rank0.pt")
    assert torch.load(out / "rank1.pt").startswith("RuntimeError: strategy=auto: probing failed on rank 0")


def test_ddp_ranks_choose_the_same(ddp_scenarios):
    out = ddp_scenarios[0] / "choose"
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert results[0]["choice"] == results[1]["choice"] == "direct"
    assert results[1]["budget"] == 100 * 10**9  # rank 0's plan, broadcast
    assert results[0]["probes"] == results[1]["probes"] == 2 and results[1]["second"] == "direct"


# -- the command line -----------------------------------------------------------------------------
def test_plan_prints_the_table_and_the_choice(cli):
    out = cli("plan", "model=ode_classifier", "data.batch_size=32", "model.state_dim=4", "model.width=8",
              "strategy.solver=rk4", "strategy.steps=6", "memory_budget=1GB")
    assert out.returncode == 0, out.stderr
    assert "| candidate | peak memory | s per step | s per solve | fits? |" in out.stdout
    assert "**chosen**" in out.stdout and "memory budget 1.00 GB" in out.stdout
    assert re.search(r"choice: (direct|checkpoint|symplectic|reversible)", out.stdout)


def test_plan_with_a_budget_nothing_fits_exits_with_the_reason(cli):
    out = cli("plan", "model=ode_classifier", "data.batch_size=32", "model.state_dim=4", "model.width=8",
              "strategy.solver=rk4", "strategy.steps=6", "memory_budget=10")
    assert out.returncode != 0
    assert "no candidate fits memory_budget=10 B" in out.stderr and "| fits? |" in out.stdout


def test_fit_with_strategy_auto_from_the_cli(cli, tmp_path):
    out = cli("fit", "strategy=auto", "strategy.solver=rk4", "strategy.steps=4", "strategy.memory_budget=1GB",
              "model.state_dim=4", "model.width=8", "data.batch_size=64", "trainer.max_epochs=1",
              "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1")
    assert out.returncode == 0, out.stderr
    assert "strategy=auto for" in out.stderr + out.stdout and "choice:" in out.stderr + out.stdout


def test_plan_refuses_another_strategy_and_says_how(cli):
    out = cli("plan", "strategy=reversible", "memory_budget=1GB", "model.state_dim=4", "model.width=8")
    assert out.returncode != 0
    assert "plan measures strategy=auto's candidates, but strategy=reversible was given" in out.stderr
    assert "strategy.candidates=" in out.stderr


def test_checkpoint_with_a_thousand_snapshots_does_not_overflow_the_stack():
    """The reversal once recursed as deep as its snapshot count (Python's limit is about 1000)."""
    field, y0 = _problem(batch=2, width=4)
    sol = Checkpoint("euler", steps=2000, snapshots=1500, schedule="binomial").solve(field, y0.clone().requires_grad_(), TS)
    sol.ys.sum().backward()
    assert sol.stats.recomputed_steps == binomial_recomputations(2000, 1500)


def test_a_candidate_that_refuses_the_field_is_a_row_not_a_crash():
    """A field with dropout: the recomputing strategies refuse it by name; Direct still serves."""

    class Dropout(Field):
        def forward(self, t, y):
            return nn.functional.dropout(super().forward(t, y), 0.5, training=True)

    torch.manual_seed(0)
    field, y0 = Dropout(2, 16).double(), torch.randn(8, 2, dtype=torch.float64)
    auto = Auto("rk4", steps=8, memory_budget="1GB")
    auto.solve(field, y0, TS)
    rows = {r.label: r for r in auto.plan.rows}
    assert auto.plan.choice == "direct"
    assert not rows["checkpoint"].fits and rows["checkpoint"].note.startswith("refused:")
    assert "refused:" in auto.plan.markdown()
    only_recomputing = Auto("rk4", steps=8, memory_budget="1GB", candidates=("checkpoint", "reversible"))
    with pytest.raises(NonDeterministicFieldError, match="checkpoint"):  # refused by all: the refusal itself
        only_recomputing.solve(field, y0, TS)


def test_past_max_plans_new_keys_reuse_the_latest_choice_and_nothing_grows(caplog):
    from nde_zoo.strategies import auto as auto_module

    field, y0 = _problem(batch=40, width=8)
    auto = Auto("rk4", steps=4, memory_budget="1GB", candidates=("direct",))
    for batch in range(1, auto_module.MAX_PLANS + 10):
        auto.solve(field, y0[:batch], TS)
    assert len(auto.plans) == auto_module.MAX_PLANS and len(auto._built) <= auto_module.MAX_PLANS
    assert auto.probes == auto_module.MAX_PLANS
    assert sum("use the latest choice" in r.message for r in caplog.records) == 1


def test_a_fixed_step_plan_loaded_into_an_adaptive_auto_ignores_its_snapshots():
    field, y0 = _problem()
    fixed = Auto("rk4", steps=24, memory_budget="1GB", candidates=("checkpoint",))
    fixed.solve(field, y0, TS)
    fixed.plans[fixed._latest].snapshots = 8  # as if the budget had asked for a binomial schedule
    adaptive = Auto("dopri5", rtol=1e-6, atol=1e-8, memory_budget="1GB", candidates=("checkpoint",))
    adaptive.load_state_dict(fixed.state_dict())
    with torch.no_grad():  # gradient-free: the latest (loaded) choice serves
        sol = adaptive.solve(field, y0, TS)
    assert isinstance(adaptive.chosen, Checkpoint) and adaptive.chosen.snapshots is None
    assert torch.isfinite(sol.ys).all()


def test_out_of_memory_while_probing_means_does_not_fit(monkeypatch):
    """On CUDA an out-of-memory error while probing marks the candidate unfit (simulated here)."""
    from nde_zoo.strategies import auto as auto_module

    real = auto_module._measure

    def measure(strategy, *args, **kwargs):
        if isinstance(strategy, (Direct, Symplectic)):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(strategy, *args, **kwargs)

    monkeypatch.setattr(auto_module, "_measure", measure)
    field, y0 = _problem()
    auto = Auto("rk4", steps=8, memory_budget="1GB", candidates=("direct", "reversible"))
    auto.solve(field, y0, TS)
    rows = {r.label: r for r in auto.plan.rows}
    assert auto.plan.choice == "reversible" and rows["direct"].note == "out of memory while probing"
    assert "| direct | not measured |" in auto.plan.markdown()
    with pytest.raises(MemoryBudgetError, match=r"no candidate could be measured .*direct: out of memory while "
                                                r"probing.*smaller batch"):
        Auto("rk4", steps=8, memory_budget="1GB", candidates=("direct", "symplectic")).solve(field, y0, TS)
