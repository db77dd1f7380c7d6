from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # tests/run_tests.sh runs two workers on two cores: one thread each
    import torch

    torch.set_num_threads(1)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run ``python -m nde_zoo ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nde_zoo", *args], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def bench_quick(tmp_path_factory):
    """``bench_quick(name)``: run ``python -m nde_zoo bench NAME --quick`` once per session, through
    the CLI as a user would; returns ``(report, markdown)``, the JSON it wrote (summary, tables,
    notes, verdicts, data) and its markdown section."""
    import json

    done: dict[str, tuple[dict, str]] = {}

    def run(name: str) -> tuple[dict, str]:
        if name not in done:
            out = tmp_path_factory.mktemp(f"bench_{name}")
            proc = run_cli("bench", name, "--quick", "--out", str(out), timeout=600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done[name] = (json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text())
        return done[name]

    return run


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
