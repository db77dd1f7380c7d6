"""The suite's own rules (tests/conftest.py): the command line runs in process, a spawn of it needs
``@pytest.mark.spawns``, a test over the time limit needs ``@pytest.mark.slow``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from _pytest.reports import TestReport

from tests import conftest
from tests.inprocess import compose, run_cli


@pytest.mark.parametrize("args, spawns", [
    ([sys.executable, "-m", "nde_zoo", "fit"], True),
    (["/venv/bin/nde-zoo", "fit", "--cfg", "job"], True),
    ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "nde_zoo", "fit"], True),
    (["srun", sys.executable, "-mnde_zoo", "fit"], True),
    ([sys.executable, "-c", "from nde_zoo.cli import main; main()"], True),
    ("python -m nde_zoo fit trainer=ddp", True),
    ([sys.executable, "-m", "nde_zoo.bench.rss", "direct", "4"], False),  # a fresh process to measure memory
    ([sys.executable, "-c", "import nde_zoo.strategies"], False),
    ([sys.executable, "-m", "pip", "wheel", "."], False),
    (["mount", "-t", "tmpfs", "tmpfs", "/mnt"], False),
])
def test_what_counts_as_spawning_the_command_line(args, spawns):
    assert conftest.spawns_command_line(args) is spawns


def test_an_unmarked_test_that_spawns_the_command_line_fails(request):
    """The guard fails the test before the process starts, and a failure the test swallows still counts."""
    with pytest.raises(pytest.fail.Exception, match="spawns the command line .*mark it @pytest.mark.spawns"):
        subprocess.run([sys.executable, "-m", "nde_zoo", "--help"], capture_output=True)
    spawned = request.node.stash[conftest._SPAWNED]
    assert spawned and "-m nde_zoo --help" in spawned[0]
    report = _report(request, "call", 0.1)
    _makereport(request.node, report)
    assert report.failed and "spawned the command line without @pytest.mark.spawns" in str(report.longrepr)
    assert not spawned  # reported once (this test's own report stays as it is)


def test_other_subprocesses_are_not_guarded():
    out = subprocess.run([sys.executable, "-c", "print('fresh')"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "fresh\n"


def _report(request, when: str, duration: float) -> TestReport:
    node = request.node
    return TestReport(node.nodeid, node.location, {}, "passed", None, when, duration=duration)


def _makereport(item, report) -> None:
    """Drive tests/conftest.py's makereport hook wrapper around ``report``."""
    hook = conftest.pytest_runtest_makereport(item, SimpleNamespace(when=report.when))
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(SimpleNamespace(get_result=lambda: report))


def test_a_test_over_the_time_limit_fails_unless_marked_slow(request, monkeypatch):
    monkeypatch.setattr(conftest, "TIME_LIMIT_S", 60.0)
    monkeypatch.setattr(conftest, "_time_limit", lambda: 60.0)
    for when in ("setup", "call"):
        report = _report(request, when, 61.0)
        _makereport(request.node, report)
        assert report.failed and "over the 60 s limit of a test not marked slow" in report.longrepr
    report = _report(request, "call", 59.0)
    _makereport(request.node, report)
    assert report.passed
    request.node.add_marker(pytest.mark.slow)
    report = _report(request, "call", 600.0)
    _makereport(request.node, report)
    assert report.passed


def test_the_time_limit_grows_with_the_load_per_core(monkeypatch):
    monkeypatch.setattr(conftest, "TIME_LIMIT_S", 60.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert conftest._time_limit() == 60.0  # an idle machine: the limit itself
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    assert conftest._time_limit() == 180.0  # three runnable processes per core: three times as long


def test_an_in_process_run_reports_as_a_process_and_puts_the_process_back(tmp_path):
    """``test`` without ``ckpt_path``: Hydra composes, logs and runs train.run, which exits with a message."""
    root = logging.getLogger()
    before = (os.getcwd(), list(sys.argv), dict(os.environ), list(root.handlers), root.level,
              torch.get_num_threads())
    out = run_cli("test", cwd=tmp_path, env={"NDE_ZOO_IN_PROCESS_PROBE": "1"})
    assert out.returncode == 1 and "error: test needs a checkpoint: pass ckpt_path=" in out.stderr
    assert (os.getcwd(), list(sys.argv), dict(os.environ), list(root.handlers), root.level,
            torch.get_num_threads()) == before
    from hydra.core.global_hydra import GlobalHydra

    assert not GlobalHydra.instance().is_initialized()
    out = run_cli("predict", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "subcommand: predict" in out.stdout


def test_compose_gives_the_command_lines_config():
    cfg = compose("fit", ["strategy=ernode", "strategy.inner=reversible", "model.width=8"])
    assert cfg.subcommand == "fit" and cfg.model.width == 8
    assert cfg.strategy._target_.endswith("ERNODE") and cfg.strategy.inner._target_.endswith("Reversible")
    assert cfg.hydra.runtime.choices.model == "ode_classifier"


def test_a_files_tests_share_a_worker_and_each_benchmarks_quick_run_is_a_group():
    group = conftest.xdist_group
    assert group("tests/test_ddp.py::test_ranks_agree[cnf-direct]") == "tests/test_ddp.py"
    assert group("tests/test_ddp.py::test_only_the_known_exit_abort_is_tolerated") == "tests/test_ddp.py"
    assert group("tests/test_bench_quick.py::test_quick_run_prints_its_tables[seminorm]") == (
        "bench_quick:seminorm")
    assert group("tests/test_bench_quick.py::test_every_goal_it_names_gets_a_verdict[seminorm]") == (
        "bench_quick:seminorm")
    assert group("tests/test_bench_quick.py::test_every_benchmark_says_which_tables_it_prints") == (
        "tests/test_bench_quick.py")
    assert group("tests/test_cli.py::test_bench_quick_writes_its_outputs") == "bench_quick:solver_overhead"
    assert group("tests/test_cli.py::test_help[fit]@mine") == "mine"  # pytest < 9: pytest-xdist's own suffix


def test_the_scheduler_groups_tests_by_their_id():
    """pytest-xdist's ``loadgroup`` cannot read the ``xdist_group`` marks under pytest 9: the suite's
    scheduler reads the groups from the ids, so a file's module fixtures run on one worker, once."""
    options = {"dist": "loadgroup", "tx": ["2*popen"]}
    config = SimpleNamespace(getvalue=options.get, option=SimpleNamespace(**options))
    scheduler = conftest.pytest_xdist_make_scheduler(config, None)
    assert scheduler._split_scope("tests/test_ddp.py::test_ranks_agree[cnf-direct]") == "tests/test_ddp.py"
    verdicts = "tests/test_bench_quick.py::test_every_met_or_missed_line_is_a_verdict[auto]"
    assert scheduler._split_scope(verdicts) == "bench_quick:auto"
    options["dist"] = "load"
    assert conftest.pytest_xdist_make_scheduler(config, None) is None  # other modes: pytest-xdist's own


def test_a_group_mark_the_id_does_not_say_is_refused(request):
    item = SimpleNamespace(nodeid="tests/test_x.py::test_y", fixturenames=[], callspec=None,
                           get_closest_marker=lambda name: pytest.mark.xdist_group("elsewhere").mark
                           if name == "xdist_group" else None, add_marker=lambda mark: None)
    with pytest.raises(pytest.UsageError, match="belongs to the group 'elsewhere'.*_SHARED_GROUPS"):
        conftest.pytest_collection_modifyitems(request.config, [item])


def test_the_group_weights_name_groups_that_exist():
    """A renamed test file or benchmark would leave its weight behind, silently: the workers would then take
    that group in the collection's order again, and the session could end on it alone."""
    from nde_zoo.bench import BENCHMARKS

    for group in conftest.GROUP_SECONDS:
        if group.startswith("bench_quick:"):
            assert group.split(":", 1)[1] in BENCHMARKS, group
        else:
            assert (conftest.REPO / group).is_file(), group


def test_the_workers_take_the_heaviest_groups_first():
    groups = {"tests/test_solvers.py": 200, "tests/test_compiled.py": 150, "bench_quick:pde": 1,
              "tests/test_configs.py": 40, "tests/test_unlisted.py": 20}
    order = conftest.heaviest_first(groups)
    # the weights listed win over the counts; unlisted groups weigh by their number of tests
    assert order[:2] == ["tests/test_compiled.py", "bench_quick:pde"]
    assert order.index("tests/test_solvers.py") < order.index("tests/test_configs.py") < order.index(
        "tests/test_unlisted.py")
