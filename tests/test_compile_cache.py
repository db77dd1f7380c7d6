"""A second process compiling the same solve reuses torch's on-disk caches (docs/compile.md, "Caches").

Three caches serve it: Inductor's code cache (the generated C++ kernels, keyed by their source),
Inductor's FX graph cache and AOTAutograd's cache (the derived graphs and the code generated for
them). torch refuses the last two for a graph holding a ``scan`` unless the operator is marked
cacheable, which the compiled solves do at their first compile (``nde_zoo._torch_compat.
cache_scan_graphs``). The warm process must hit both graph caches (their own counters say so) and
compile no kernel of its own, and its gradient must be the cold one's; each process still traces
with Dynamo (that is not cached).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two fresh processes, one cold Inductor compile: about 40 s on 2 cores

CHILD = r"""
import json, time
import torch
from torch import nn
from nde_zoo.strategies import Direct

class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, t, y):
        return self.net(y)

torch.manual_seed(0)
field = Field().double()
y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
strategy = Direct("euler", steps=4, compile="strict")
start = time.perf_counter()
ys = strategy.solve(field, y0, torch.tensor([0.0, 1.0], dtype=torch.float64)).ys
ys.pow(2).sum().backward()
from torch._dynamo.utils import counters
print(json.dumps({"compiles": strategy.programs.compiles, "seconds": time.perf_counter() - start,
                  "grad": y0.grad.tolist(), "fx_graph": dict(counters["inductor"]),
                  "aot_autograd": dict(counters["aot_autograd"])}))
"""


def _kernels(cache: Path) -> set[str]:
    """The compiled kernel libraries in an Inductor cache directory."""
    return {str(p.relative_to(cache)) for p in cache.rglob("*.so")}


def _compile_in_a_fresh_process(cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "NDE_ZOO_COMPILE_BACKEND": "inductor"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_graphs_and_kernels_from_the_cache(tmp_path):
    cache = tmp_path / "inductor"
    cold = _compile_in_a_fresh_process(cache)
    kernels = _kernels(cache)
    assert cold["compiles"] >= 1 and kernels, (cold, kernels)  # it compiled, and kept its kernels
    assert cold["fx_graph"].get("fxgraph_cache_miss", 0) >= 1, cold  # cacheable: missed, not bypassed
    assert not cold["fx_graph"].get("fxgraph_cache_bypass") and not cold["aot_autograd"].get("autograd_cache_bypass")
    warm = _compile_in_a_fresh_process(cache)
    assert warm["compiles"] == cold["compiles"]  # the same programs, traced again in the new process
    assert warm["fx_graph"].get("fxgraph_cache_hit", 0) == cold["fx_graph"]["fxgraph_cache_miss"], warm
    assert not warm["fx_graph"].get("fxgraph_cache_miss"), warm  # every graph, the lazy backward's too
    assert warm["aot_autograd"].get("autograd_cache_hit", 0) >= 1, warm
    assert _kernels(cache) == kernels  # ... and every kernel came from the cache: none compiled anew
    assert warm["grad"] == cold["grad"]  # the cached programs compute what the compiled ones did
    print(f"first call: cold cache {cold['seconds']:.1f} s, warm cache {warm['seconds']:.1f} s")
