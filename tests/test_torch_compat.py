"""The private torch APIs nde_zoo uses (nde_zoo/_torch_compat.py) exist on the installed torch,
and importing nde_zoo changes nothing in torch's global configuration."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn


def test_importing_the_strategies_leaves_dynamos_limits_at_torchs_defaults():
    import nde_zoo.strategies  # noqa: F401
    from nde_zoo.driver import programs  # noqa: F401  (the compiled programs: imported by a compiled solve)

    config = torch._dynamo.config
    assert config.recompile_limit == config._config["recompile_limit"].default
    assert config.accumulated_recompile_limit == config._config["accumulated_recompile_limit"].default


def test_importing_the_strategies_leaves_inductors_caches_as_torch_has_them():
    """scan is marked cacheable at the first compile, not at import (in a fresh process: this one may
    have compiled already)."""
    import subprocess
    import sys

    code = ("import nde_zoo.strategies, nde_zoo.driver.programs, torch._inductor.config as c; "
            "print(sorted(c.unsafe_marked_cacheable_functions))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_compile_limits_are_raised_only_inside_the_scope_and_never_lowered():
    from nde_zoo._torch_compat import RECOMPILE_LIMIT, compile_limits

    config = torch._dynamo.config
    before = config.recompile_limit
    with compile_limits():
        assert config.recompile_limit == max(before, RECOMPILE_LIMIT)
    assert config.recompile_limit == before
    with config.patch(recompile_limit=10_000), compile_limits():
        assert config.recompile_limit == 10_000  # a user's higher limit is kept


def test_the_private_names_exist_on_this_torch():
    from nde_zoo._torch_compat import DropoutBase, cache_scan_graphs, scan, suspended_saved_tensors_hooks
    from torch._higher_order_ops.scan import scan_op

    assert cache_scan_graphs(), "torch._inductor.config.unsafe_marked_cacheable_functions is gone"
    assert scan_op.cacheable(), "scan is marked, but torch's caches would still refuse it"

    assert scan is not None, "torch._higher_order_ops.scan is gone: the compiled solves fall back to eager"
    assert all(issubclass(cls, DropoutBase) for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout))
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: seen.append(1) or x, lambda x: x):
        with suspended_saved_tensors_hooks():
            (torch.ones(2, requires_grad=True) * 2).sum()
        assert not seen, "a hook ran while suspended"
        (torch.ones(2, requires_grad=True).exp()).sum()
    assert seen, "the hook was not restored"


def test_the_profilers_memory_events_and_dynamos_counter_are_read_on_this_torch():
    from torch.profiler import ProfilerActivity, profile, record_function

    from nde_zoo._torch_compat import graphs_compiled, profiler_memory_events, profiler_running

    assert not profiler_running()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert profiler_running()
        with record_function("test::block"):
            kept = torch.ones(1000, dtype=torch.float64)  # 8000 bytes, alive after the block
    events, phases = profiler_memory_events(prof, "test::")
    assert sum(nbytes for _, nbytes in events) >= kept.nbytes and list(phases) == ["block"]
    before = graphs_compiled()
    torch.compile(lambda x: x * 2, backend="eager")(torch.ones(3))
    assert graphs_compiled() == before + 1


def test_the_config_module_does_not_import_the_strategies_back():
    """base imports config (to record constructor arguments); config must not import base."""
    import ast
    from pathlib import Path

    import nde_zoo.strategies.config as config

    tree = ast.parse(Path(config.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.startswith("nde_zoo.strategies") for m in imported), imported


def _imported_modules(package_dir) -> dict[str, set[str]]:
    """For each file of a package: every module it imports, and ``module.name`` for each name it
    imports from one (``from nde_zoo import strategies``), relative imports resolved."""
    import ast

    package = f"nde_zoo.{package_dir.name}"
    found = {}
    for path in sorted(package_dir.glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(str(node.args[0].value))
        found[path.name] = names
    return found


def test_lower_layers_never_import_upper_ones():
    """solvers -> driver -> strategies: the numerics know no driver, the driver knows no strategy.

    Function-level imports count too: a lazy import upward is still a cycle waiting to happen.
    """
    from pathlib import Path

    import nde_zoo

    root = Path(nde_zoo.__file__).parent
    for layer, above in (("solvers", ("nde_zoo.driver", "nde_zoo.strategies", "nde_zoo.models")),
                         ("driver", ("nde_zoo.strategies", "nde_zoo.models"))):
        for file, modules in _imported_modules(root / layer).items():
            upward = sorted(m for m in modules if m.startswith(above))
            assert not upward, f"nde_zoo/{layer}/{file} imports {upward}"
