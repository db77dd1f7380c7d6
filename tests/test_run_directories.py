"""Run directories: a refused ``fit`` leaves the directory byte for byte as it was, and the temporary
files that a kill in the middle of a save leaves behind are removed by the next fit or resume.

- A refused ``fit`` (the directory holds another run's checkpoints, or another fit claimed it) used
  to refuse only after Hydra had written ``.hydra/`` and appended to ``cli.log`` there: the other
  run's recorded config then named the refused run's settings. The claim now comes first.
- Every kill during a checkpoint write left ``.last.ckpt.<pid>.tmp`` in ``checkpoints/`` forever.

The fits run in this process (``nde_zoo.cli.main``), on a few batches of digits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO

#: a checkpoint written before checkpoints recorded the nde_zoo version: ode_classifier
#: (state_dim=4, width=8) trained one epoch with strategy=ernode (inner Direct rk4, 2 steps).
UNVERSIONED = REPO / "tests" / "fixtures" / "checkpoint_unversioned_ernode.pt"
TINY = [
    "model=ode_classifier",
    "model.state_dim=4",
    "model.width=8",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "test_after_fit=false",
]


def nde_zoo_in_process(*args: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``python -m nde_zoo ARGS`` in this process; logging, threads, environment and argv put back after."""
    from nde_zoo import cli

    root = logging.getLogger()
    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    handlers, level, threads, environ = (
        root.handlers[:],
        root.level,
        torch.get_num_threads(),
        dict(os.environ),
    )
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        return cli.main(["nde_zoo", *args])
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (hs, propagate) in saved.items():
            logging.getLogger(name).handlers[:] = hs
            logging.getLogger(name).propagate = propagate
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: a folder as ``<dir>``, a file as the sha256 of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_a_refused_fit_leaves_the_run_directory_untouched(tmp_path, monkeypatch):
    run = tmp_path / "run"  # another run's directory, as a fit leaves it
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"the other run's weights")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- model.width=100\n")
    (run / "cli.log").write_text("[2026-12-01 10:00:00,000][nde_zoo][INFO] - the other run\n")
    before = _tree(run)
    with pytest.raises(SystemExit, match=f"the run directory {run} already holds another run's checkpoints"):
        nde_zoo_in_process(
            "fit",
            *TINY,
            "model.width=7",
            "strategy=symplectic",
            f"hydra.run.dir={run}",
            monkeypatch=monkeypatch,
        )
    assert _tree(run) == before  # no .hydra/config.yaml, overrides.yaml or cli.log line of the refused fit

    from nde_zoo.checkpoints import CLAIM_FILE

    claimed = tmp_path / "claimed"  # claimed by a fit still running (a live process of this host)
    claimed.mkdir()
    owner = {"id": "x", "pid": os.getppid(), "host": socket.gethostname()}
    (claimed / CLAIM_FILE).write_text(json.dumps(owner))
    before = _tree(claimed)
    with pytest.raises(SystemExit, match=f"the run directory {claimed} belongs to another fit"):
        nde_zoo_in_process("fit", *TINY, f"hydra.run.dir={claimed}", monkeypatch=monkeypatch)
    assert _tree(claimed) == before


def test_remove_stale_temp_files_rules(tmp_path, caplog):
    from nde_zoo.checkpoints import CLAIM_FILE, remove_stale_temp_files

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    gone, alive = dead_pid(), os.getppid()
    stale = [folder / f".last.ckpt.{gone}.tmp", folder / f".epoch003.ckpt.{gone}.tmp"]
    kept = [
        folder / f".last.ckpt.{alive}.tmp",
        folder / f".last.ckpt.{os.getpid()}.tmp",
        folder / "last.ckpt",
        folder / f"last.ckpt.{gone}.tmp",
        folder / "notes.tmp",
    ]
    for path in stale + kept:
        path.write_bytes(b"x" * 100)
    (tmp_path / "run" / CLAIM_FILE).write_text(json.dumps({"pid": gone, "host": "another-host"}))
    assert remove_stale_temp_files(folder) == []  # pids of another host name nothing here
    (tmp_path / "run" / CLAIM_FILE).write_text(json.dumps({"pid": gone, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="nde_zoo"):
        assert sorted(remove_stale_temp_files(folder)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert f"removed 2 temporary checkpoint file(s) from {folder}" in caplog.text
    assert "(200 bytes)" in caplog.text and stale[0].name in caplog.text
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_fit_and_a_resume_remove_temp_files_of_killed_saves(tmp_path, monkeypatch):
    killed = tmp_path / "killed"  # a run killed twice mid-save: its last.ckpt is whole, two temp files stay
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(UNVERSIONED, killed / "checkpoints" / "last.ckpt")
    stale = [killed / "checkpoints" / f".last.ckpt.{dead_pid()}.tmp" for _ in range(2)]
    for path in stale:
        path.write_bytes(b"partial checkpoint" * 50)
    resumed = tmp_path / "resumed"
    nde_zoo_in_process(
        "fit",
        *TINY,
        f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={resumed}",
        monkeypatch=monkeypatch,
    )
    assert not any(p.exists() for p in stale)
    log = (resumed / "cli.log").read_text()
    assert f"removed 2 temporary checkpoint file(s) from {killed / 'checkpoints'}" in log, log
    assert (resumed / "checkpoints" / "last.ckpt").is_file()

    fresh = tmp_path / "fresh"  # a new fit into a directory whose first save was killed
    (fresh / "checkpoints").mkdir(parents=True)
    left = fresh / "checkpoints" / f".last.ckpt.{dead_pid()}.tmp"
    left.write_bytes(b"partial")
    nde_zoo_in_process(
        "fit",
        *TINY,
        "trainer.max_epochs=1",
        "strategy.solver=rk4",
        "strategy.steps=2",
        f"hydra.run.dir={fresh}",
        monkeypatch=monkeypatch,
    )
    assert not left.exists()
    log = (fresh / "cli.log").read_text()
    assert f"removed 1 temporary checkpoint file(s) from {fresh / 'checkpoints'}" in log
    assert not [p for p in (fresh / "checkpoints").iterdir() if p.suffix == ".tmp"]
