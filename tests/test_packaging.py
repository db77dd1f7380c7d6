"""The wheel ships the configs and the examples: an installed `nde-zoo` finds them from any directory."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.spawns
@pytest.mark.timeout(600)
def test_wheel_installs_and_finds_its_configs(tmp_path):
    pytest.importorskip("hatchling")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True, timeout=300)
    wheel = next(dist.glob("nde_zoo-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Dependencies come from the test environment; nde_zoo itself only from the wheel.
    packages = [p for p in site.getsitepackages() if Path(p).is_dir()]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(packages) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    where = subprocess.run([str(python), "-c", "import nde_zoo; print(nde_zoo.__file__)"], cwd="/",
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where
    # docs/extending.md's examples ship too, and run from where examples_dir() says they are
    examples = subprocess.run([str(python), "-c", "from nde_zoo.configs_path import examples_dir; "
                               "print(examples_dir())"], cwd="/", check=True, capture_output=True,
                              text=True).stdout.strip()
    assert examples.startswith(str(venv)) and Path(examples, "extending", "new_model.py").is_file(), examples
    ran = subprocess.run([str(python), str(Path(examples, "extending", "new_datamodule.py"))], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "SineDataModule splits:" in ran.stdout, ran.stderr[-2000:]
    out = subprocess.run([str(venv / "bin" / "nde-zoo"), "fit", "model=ode_classifier", "--cfg", "job"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_target_: nde_zoo.models.ODEClassifier" in out.stdout


def test_examples_dir_in_a_clone_is_the_repositorys():
    from nde_zoo.configs_path import examples_dir

    assert examples_dir() == REPO / "examples" and (examples_dir() / "extending" / "new_model.py").is_file()
