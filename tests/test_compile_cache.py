"""A second process compiling the same solve reuses Inductor's on-disk cache (docs/compile.md, "Caches").

What torch 2.13 can cache for our programs: the generated C++ kernels (Inductor's code cache, keyed
by the kernel's source), not the traced graphs. Its FX-graph and AOTAutograd caches refuse a graph
holding a ``scan`` ("Can't cache HigherOrderOperator: scan"), which every compiled solve is, so
each new process traces again and only the C++ compile, the largest share of a cold compile, is
skipped. This test pins the part that can be cached: the warm process compiles no kernel of its
own (it prints both first calls; docs/compile.md gives them).
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
print(json.dumps({"compiles": strategy.programs.compiles, "seconds": time.perf_counter() - start}))
"""


def _kernels(cache: Path) -> set[str]:
    """The compiled kernel libraries in an Inductor cache directory."""
    return {str(p.relative_to(cache)) for p in cache.rglob("*.so")}


def _compile_in_a_fresh_process(cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "NDE_ZOO_COMPILE_BACKEND": "inductor"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_compiles_no_kernel_of_its_own(tmp_path):
    cache = tmp_path / "inductor"
    cold = _compile_in_a_fresh_process(cache)
    kernels = _kernels(cache)
    assert cold["compiles"] >= 1 and kernels, (cold, kernels)  # it compiled, and kept its kernels
    warm = _compile_in_a_fresh_process(cache)
    assert warm["compiles"] == cold["compiles"]  # the same programs, traced again in the new process
    assert _kernels(cache) == kernels  # ... but every kernel came from the cache: none compiled anew
    print(f"first call: cold cache {cold['seconds']:.1f} s, warm cache {warm['seconds']:.1f} s")
