"""docs/extending.md's runnable examples: a new datamodule, a new model
family and a new gradient strategy with the full contract, each run here at tiny sizes; and the
CLI's gradcheck refusal of a custom strategy points to the doc."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "extending"
DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def test_new_datamodule_needs_only_its_data(example):
    module = example("new_datamodule")
    assert module.main() == {"train": 64, "val": 16, "test": 16}
    assert [m for m in vars(module.SineDataModule) if "dataloader" in m] == []  # all inherited


def test_new_model_family_trains_and_loads_from_its_checkpoint(example, tmp_path):
    assert example("new_model").main(max_steps=30, tmp=str(tmp_path)) < 0.5  # the test MSE falls


def test_new_strategy_is_exact_and_counts_its_memory(example):
    errors = example("new_strategy").main()
    assert errors["all"] < 1e-12


def test_gradcheck_of_a_custom_strategy_points_to_the_doc(example):
    from nde_zoo.fidelity import reference_strategy

    strategy = example("new_strategy").StepCheckpoint(steps=2)
    with pytest.raises(ValueError, match=r"reference=.*docs/extending.md \('A new gradient strategy'\)"):
        reference_strategy(strategy)


def test_gradcheck_from_the_cli_with_a_custom_strategy_points_to_the_doc(cli, tmp_path):
    out = cli("gradcheck", "~strategy", "+strategy={_target_: new_strategy.StepCheckpoint, steps: 2}",
              "model.state_dim=4",
              "model.width=8", cwd=tmp_path,
              env={"PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode != 0
    assert "docs/extending.md" in out.stderr, out.stderr[-3000:]


def test_the_doc_covers_the_whole_contract():
    text = DOC.read_text()
    for needle in ("kinds", "name", "solve", "Solution", "SolveStats", "_record", "SavedBytes",
                   "gradient_fidelity", "reference=", "make_splits", "NeuralDE", "build_field",
                   "examples/extending/new_strategy.py", "examples/extending/new_model.py",
                   "examples/extending/new_datamodule.py"):
        assert needle in text, needle


@pytest.mark.parametrize("compile", [False, "strict"], ids=["eager", "compiled"])
def test_a_strategy_on_the_driver_runs_eager_and_compiled_without_a_loop(example, compile, monkeypatch):
    """docs/extending.md's strategy on the driver: a forward step, what it keeps and a reverse step,
    no loop of its own; eager and compiled (strict: no silent fall-back), its gradient is Direct's."""
    from nde_zoo.driver.programs import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    module = example("driver_strategy")
    assert module.main(compile=compile) < 1e-10
    source = (EXAMPLES / "driver_strategy.py").read_text()
    strategy_code = source.split("class StepwiseHeunScheme")[1].split("def gradients")[0]
    assert not re.search(r"^\s*(for|while) ", strategy_code, re.MULTILINE)  # no loop of its own


def test_a_strategy_importing_the_driver_from_its_old_place_keeps_working():
    """Strategies written before the driver became its own layer import it from nde_zoo.strategies.driver."""
    import nde_zoo.driver as driver
    from nde_zoo.strategies.driver import Scheme, add_grads, solve

    assert (Scheme, add_grads, solve) == (driver.Scheme, driver.add_grads, driver.solve)


def test_the_driver_modules_old_paths_still_import_and_unpickle():
    """A strategy pickled before the move holds nde_zoo.strategies._compiled.Programs by that path."""
    import importlib
    import pickle

    import nde_zoo.driver.programs as programs
    from nde_zoo.strategies import Reversible

    assert importlib.import_module("nde_zoo.strategies._compiled") is programs
    assert importlib.import_module("nde_zoo.strategies.fields").inspect_field is not None
    from nde_zoo.strategies.schedule import Schedule  # noqa: F401

    strategy = Reversible("midpoint", steps=4, compile=True)
    # protocol 0 names a class as text ("c<module>\n<name>"): the old path can be written in
    old = pickle.dumps(strategy, protocol=0).replace(b"nde_zoo.driver.programs", b"nde_zoo.strategies._compiled")
    assert b"nde_zoo.strategies._compiled" in old
    assert type(pickle.loads(old).programs) is programs.Programs
