"""Peak resident-memory growth of one training step, measured in a fresh process.

The kernel's high-water mark of the process (``VmHWM``; ``ru_maxrss`` where there is no
/proc, but that one survives fork+exec from a large parent) is read before and after one
forward and backward pass, in a fresh subprocess per measurement.
``python -m nde_zoo.bench.rss STRATEGY STEPS BATCH DIM WIDTH`` prints it in MiB.

:func:`training_step_rss_growth` does the same for any pickled model and loss: after a
warm-up step the freed heap is handed back (``malloc_trim``) and the high-water mark reset
to the current RSS (``/proc/self/clear_refs``), so the figure is one step's peak above the
memory resident before it.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from typing import Any

__all__ = ["peak_rss_growth_mib", "training_step_rss_growth"]


def training_step_rss_growth(model: Any, batch: Any, loss: str) -> float | None:
    """Peak RSS growth in bytes of one forward + backward of ``model`` in a fresh process.

    Args:
        model: a picklable ``nn.Module`` (its strategy included).
        batch: what ``loss`` takes with the model.
        loss: ``"module:function"``, ``function(model, batch) -> scalar Tensor``.

    Returns ``None`` where there is no ``/proc/self/clear_refs`` (not Linux).
    """
    import torch

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.pt")
        torch.save({"model": model, "batch": batch, "loss": loss}, path)
        res = subprocess.run(
            [sys.executable, "-c", f"from nde_zoo.bench.rss import _step_probe; _step_probe({path!r})"],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        )
    if res.returncode != 0:
        raise RuntimeError(f"RSS probe ({loss}) failed:\n{res.stderr[-2000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["rss_growth"])


def _step_probe(path: str) -> None:
    """Subprocess entry of :func:`training_step_rss_growth`: prints ``{"rss_growth": bytes}``."""
    import torch

    torch.set_num_threads(1)
    blob = torch.load(path, weights_only=False)
    model, batch = blob["model"], blob["batch"]
    module, name = blob["loss"].split(":")
    loss_fn = getattr(importlib.import_module(module), name)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()

    def status(key: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    step()
    print(json.dumps({"rss_growth": status("VmHWM:") - before}))


def peak_rss_growth_mib(strategy: str, steps: int, batch: int, dim: int, width: int) -> float:
    """Run the probe in a subprocess; ``strategy`` is ``"direct"`` or ``"reversible"`` (midpoint)."""
    out = subprocess.run(
        [sys.executable, "-m", "nde_zoo.bench.rss", strategy, str(steps), str(batch), str(dim), str(width)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"])


def _high_water_kib() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _probe(strategy: str, steps: int, batch: int, dim: int, width: int) -> float:
    import torch
    from torch import nn

    from nde_zoo.strategies import Direct, Reversible

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

        def forward(self, t, y):
            return self.net(y)

    field = Field()
    y0 = torch.randn(batch, dim)
    ts = torch.tensor([0.0, 1.0])
    chosen = {"direct": Direct, "reversible": Reversible}[strategy]("midpoint", steps=steps)
    chosen.solve(field, y0[:2], ts).ys.sum().backward()  # warm up allocator and kernels on a tiny batch
    before = _high_water_kib()
    chosen.solve(field, y0, ts).ys[-1].square().mean().backward()
    return (_high_water_kib() - before) / 1024.0


if __name__ == "__main__":
    name, *numbers = sys.argv[1:]
    steps, batch, dim, width = (int(x) for x in numbers)
    print(json.dumps({"growth_mib": _probe(name, steps, batch, dim, width)}))
