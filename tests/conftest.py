"""Shared fixtures and the suite's rules.

- ``cli``: the command line, run in this process (tests/inprocess.py); ``cli_subprocess``: the
  same in a fresh ``python -m nde_zoo`` process, for the tests that need one.
- A test that spawns the command line (``python -m nde_zoo``, ``nde-zoo``, through torchrun or
  srun too) fails unless it is marked ``@pytest.mark.spawns``: a spawn pays 5-8 s of imports
  before it does any work, so only tests about the process itself (signals, DDP, launchers, the
  installed script) may.
- A test not marked ``slow`` fails when its setup or its body takes more than
  ``NDE_ZOO_TEST_TIME_LIMIT`` seconds (60 by default, 0 turns it off), scaled up by the machine's
  load per core when other work shares it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inprocess import run_cli as run_cli_in_process

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread per test process, and for the processes tests start: the suite runs two workers on
# two cores, and a torch process with two threads on a busy core runs its small kernels many times slower
# (the threads wait on each other: 29 s for `bench solver_overhead --quick` on one thread, over 300 s on
# two, with the machine's load at 9). NDE_ZOO_TEST_THREADS=N gives them N.
_THREADS = os.environ.get("NDE_ZOO_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
# Inductor compiles in the test process too, not in a pool of processes of its own: each pool process
# imports torch before it compiles anything (2 s of a 19 s first compile here), and on two busy cores
# the pool only competes with the other worker.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", _THREADS)
import torch  # noqa: E402

torch.set_num_threads(int(_THREADS))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run ``python -m nde_zoo ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nde_zoo", *args], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )


@pytest.fixture
def cli():
    """``cli(*args, cwd=, env=)``: ``python -m nde_zoo ARGS`` run in this process."""
    return run_cli_in_process


@pytest.fixture
def cli_subprocess():
    """``cli_subprocess(*args, cwd=, timeout=, env=)``: ``python -m nde_zoo ARGS`` in a subprocess
    (the test must be marked ``spawns``)."""
    return run_cli


@pytest.fixture(scope="session")
def bench_quick(tmp_path_factory):
    """``bench_quick(name)``: run ``nde-zoo bench NAME --quick`` once per session, in process,
    through the command line's entry point; returns ``(report, markdown)``, the JSON it wrote
    (summary, tables, notes, verdicts, data) and its markdown section."""
    import json

    done = _BENCH_RUNS  # kept by the process: xdist tears session fixtures down when a worker's queue runs dry

    def run(name: str) -> tuple[dict, str]:
        if name not in done:
            out = tmp_path_factory.mktemp(f"bench_{name}")
            proc = run_cli_in_process("bench", name, "--quick", "--out", str(out))
            assert proc.returncode == 0, proc.stderr[-4000:]
            report = json.loads((out / f"{name}.json").read_text())
            assert all(f"**{t['title']}**" in proc.stdout for t in report["tables"])  # it printed its tables
            done[name] = (report, (out / f"{name}.md").read_text())
            _BENCH_OUT[name] = out
        return done[name]

    run.out = _BENCH_OUT  # name -> the --out folder of its run
    return run


_BENCH_RUNS: dict[str, tuple[dict, str]] = {}
_BENCH_OUT: dict[str, Path] = {}


# --- which tests share a worker ---------------------------------------------------------------

_E2E_FIXTURES = {"cli", "cli_subprocess", "bench_quick"}
#: files of end-to-end runs without those fixtures: fits (one step of every cell of the compatibility
#: matrix, each model family training, resumes, run directories), inductor compiles, a wheel built and
#: installed, benchmarks' parts, memory measured in fresh processes
_E2E_FILES = {f"tests/test_{name}.py" for name in (
    "matrix", "compiled", "compiled_recompile", "bench_compiled", "bench_gradients", "bench_seminorm",
    "packaging", "resume", "resume_strategy", "run_directories", "cnf", "sde", "cde", "latent_ode",
    "data_recipes", "datamodules", "pictures", "own_field", "density_tabular", "ode_classifier", "ernode",
    "field_from_config", "state_store", "auto", "auto_allocator", "extending_examples", "quiet_runs",
    "cli_stepping", "checkpoint_config", "checkpoint_safety", "bad_input", "sweep_table",
    "ernode_inner_config", "cnf_main_job", "pde", "pde_ddp", "step_timer_compile",
)}
#: single tests of the fast tier's files that take tens of seconds (memory over thousands of solves,
#: a field's own derivatives, a seminorm gradient with the time channel)
_E2E_TESTS = (
    "tests/test_baseline_strategies.py::test_seminorm_drops_the_time_channel_unless_ts_needs_a_gradient",
    "tests/test_bounded_memory.py::test_2000_plain_python_solves_keep_rss_flat",
    "tests/test_recompute_guards.py::test_a_field_that_takes_its_own_derivatives_does_not_leak",
    "tests/test_schedule.py::test_the_schedule_predicts_what_the_reversal_holds[compiled-",  # inductor compiles
)


#: tests that share a benchmark's quick run with tests/test_bench_quick.py's (their ``xdist_group`` mark
#: names the group; the scheduler reads it here, from the test's id)
_SHARED_GROUPS = {
    "tests/test_cli.py::test_bench_quick_writes_its_outputs": "bench_quick:solver_overhead",
    "tests/test_cnf_memory.py::test_quick_run_measures_nll_and_memory": "bench_quick:cnf_memory",
}


def xdist_group(nodeid: str) -> str:
    """The worker a test runs on, by group (``--dist loadgroup``, tests/run_tests.sh): a test file's tests
    share one (its module fixtures run once, as with ``--dist loadfile``), except that each benchmark's
    quick run (tests/test_bench_quick.py's ``[NAME]``) is a group of its own, so the benchmarks spread over
    the workers, each run once (``bench_quick`` keeps a run per worker).

    The scheduler sees only the test's id: pytest 9 keeps a node's id where pytest-xdist 3.8 cannot
    append the ``@group`` of an ``xdist_group`` mark, so its own grouping put every test on a worker of
    its own (each worker ran the module fixtures, the DDP group and the quick runs again)."""
    if nodeid.rfind("@") > nodeid.rfind("]"):  # pytest < 9: pytest-xdist appended the mark's group
        return nodeid.rsplit("@", 1)[1]
    for prefix, group in _SHARED_GROUPS.items():
        if nodeid == prefix or nodeid.startswith(prefix + "["):
            return group
    path, _, rest = nodeid.partition("::")
    if path == "tests/test_bench_quick.py" and rest.endswith("]") and "[" in rest:
        return "bench_quick:" + rest[rest.index("[") + 1:-1]
    return path


#: seconds a group takes on one worker of `make test` (2 cores, idle, cold caches; 2026-12-08): only the
#: order in which the workers take the groups depends on them (:func:`heaviest_first`). A group not
#: listed counts ``_SECONDS_PER_TEST`` a test.
GROUP_SECONDS = {
    "tests/test_compiled.py": 210, "tests/test_ddp.py": 55, "tests/test_auto.py": 50,
    "tests/test_cli_strategies.py": 45, "tests/test_cli.py": 38, "tests/test_matrix.py": 35,
    "tests/test_compile_cache.py": 32, "bench_quick:pde": 30, "tests/test_checkpoint_safety.py": 28,
    "tests/test_launch.py": 50, "tests/test_ddp_rank_death.py": 25, "tests/test_pde.py": 21,
    "bench_quick:symplectic": 18, "bench_quick:white_dwarf": 18, "tests/test_resume.py": 17,
    "bench_quick:cde_memory": 15, "bench_quick:cnf_memory": 15, "tests/test_bounded_memory.py": 14,
    "tests/test_schedule.py": 14, "tests/test_ddp_sync.py": 13, "tests/test_compiled_user_fields.py": 13,
    "bench_quick:seminorm": 12, "tests/test_packaging.py": 12,
}
_SECONDS_PER_TEST = 0.1


def heaviest_first(groups: dict[str, int]) -> list[str]:
    """The groups (name -> number of tests) in the order the workers take them: the longest first
    (longest-processing-time scheduling), so that the session does not end with one worker running a long
    group alone while the other waits; groups of equal weight keep the collection's order."""
    return sorted(groups, key=lambda group: -GROUP_SECONDS.get(group, _SECONDS_PER_TEST * groups[group]))


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the groups of :func:`xdist_group`, the heaviest taken first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # xdist's own order (most tests first) is replaced below

    class GroupScheduling(LoadScopeScheduling):
        _ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self._ordered:  # the queue is complete when the first unit is taken
                self._ordered = True
                units = dict(self.workqueue)
                self.workqueue.clear()
                for group in heaviest_first({group: len(tests) for group, tests in units.items()}):
                    self.workqueue[group] = units[group]
            super()._assign_work_unit(node)

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests that run the command line are marked ``e2e``. A test's ``xdist_group`` mark, and the group of
    a test of a benchmark's quick run, must be the group :func:`xdist_group` reads from its id."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if (_E2E_FIXTURES & set(item.fixturenames) or item.get_closest_marker("spawns") or path in _E2E_FILES
                or item.nodeid.startswith(_E2E_TESTS)):
            item.add_marker(pytest.mark.e2e)  # the command line end to end: `make test`, not `make check`
        mark = item.get_closest_marker("xdist_group")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if mark is not None:
            group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        elif "bench_quick" in item.fixturenames and "name" in params:
            group = f"bench_quick:{params['name']}"
        else:
            continue
        if xdist_group(item.nodeid) != group:
            raise pytest.UsageError(f"{item.nodeid} belongs to the group {group!r}, which its id does not "
                                    f"say: add it to _SHARED_GROUPS in tests/conftest.py")


# --- the guard: no unmarked spawns of the command line -------------------------------------------

_PYTHON_FLAGS_WITH_VALUE = {"-W", "-X", "-Q"}


def spawns_command_line(args, shell: bool = False) -> bool:
    """Whether a ``subprocess.Popen(args)`` runs the zoo's command line: ``python -m nde_zoo``,
    the ``nde-zoo`` script, or code (``-c``) or a script that calls ``nde_zoo.cli``, directly or
    through a launcher (``torchrun ... -m nde_zoo``, ``srun python -m nde_zoo``).

    Fresh processes that measure memory (``-m nde_zoo.bench.rss``, a probe script) are not the
    command line and are allowed."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = shlex.split(os.fsdecode(args)) if shell or isinstance(args, str) and " " in args else [args]
    words = [os.fsdecode(a) for a in args]
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if Path(word).name == "nde-zoo" or word == "-m" and nxt == "nde_zoo" or word == "-mnde_zoo":
            return True
        if word == "-c" and ("nde_zoo.cli" in nxt or "nde_zoo.__main__" in nxt):
            return True
        if word.endswith(".py") and Path(word).is_file() and i > 0 and words[i - 1] not in _PYTHON_FLAGS_WITH_VALUE:
            try:
                text = Path(word).read_text(errors="replace")
            except OSError:
                continue
            if "nde_zoo.cli" in text or "nde_zoo.__main__" in text:
                return True
    return False


_current_test: list[pytest.Item] = []  # the test being set up, run or torn down


def _guarded_popen_init(self, args, *rest, **kwargs):
    item = _current_test[-1] if _current_test else None
    if item is not None and not item.get_closest_marker("spawns") and spawns_command_line(
        args, shell=bool(kwargs.get("shell"))
    ):
        command = args if isinstance(args, str) else " ".join(map(os.fsdecode, args))
        item.stash.setdefault(_SPAWNED, []).append(command)
        pytest.fail(
            f"{item.nodeid} spawns the command line ({command[:200]}): run it in process with the `cli` fixture "
            f"(tests/inprocess.py), or, if it needs a process of its own (signals, DDP, launchers), mark it "
            f"@pytest.mark.spawns",
            pytrace=False,
        )
    _real_popen_init(self, args, *rest, **kwargs)


_SPAWNED = pytest.StashKey[list]()
_real_popen_init = subprocess.Popen.__init__


def pytest_configure(config):
    subprocess.Popen.__init__ = _guarded_popen_init  # session fixtures (set up by a test) included


def pytest_unconfigure(config):
    subprocess.Popen.__init__ = _real_popen_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current_test.append(item)
    try:
        yield
    finally:
        _current_test.pop()


# --- the time limit of a test not marked slow ----------------------------------------------------

TIME_LIMIT_S = float(os.environ.get("NDE_ZOO_TEST_TIME_LIMIT", "60"))


def _time_limit() -> float:
    """The limit in seconds, scaled by the run queue per core above one (a machine shared with other
    work runs every test slower; the limit is for tests that are slow by themselves)."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 1.0
    return TIME_LIMIT_S * max(1.0, load)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    spawned = item.stash.get(_SPAWNED, [])
    if spawned and report.passed:  # the failure was caught and swallowed by the test: still a failure
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} spawned the command line without @pytest.mark.spawns: {spawned[0][:200]}"
        spawned.clear()
        return
    if not TIME_LIMIT_S or call.when not in ("setup", "call") or not report.passed:
        return
    if item.get_closest_marker("slow"):
        return
    limit = _time_limit()
    if report.duration > limit:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: its {call.when} took {report.duration:.1f} s, over the {limit:.0f} s limit of a test not "
            f"marked slow ({TIME_LIMIT_S:.0f} s scaled by the load per core). Make it faster, or mark it "
            f"@pytest.mark.slow (it then runs in `make test`, not in `make check`); NDE_ZOO_TEST_TIME_LIMIT=0 "
            f"turns the limit off"
        )


@pytest.fixture(autouse=True)
def _no_hydra_state_leaks_between_tests():
    """Hydra's HydraConfig and GlobalHydra are process-wide singletons: a test that runs the
    command line in process leaves them set, and a later test in the same worker would then write
    its pictures into the earlier run's directory (``train._run_dir`` reads HydraConfig)."""
    yield
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
