"""Peak resident-memory growth of one training step, measured in a fresh process.

The kernel's high-water mark of the process (``VmHWM``; ``ru_maxrss`` where there is no
/proc, but that one survives fork+exec from a large parent) is read before and after one
forward and backward pass, in a fresh subprocess per measurement.
``python -m nde_zoo.bench.rss STRATEGY STEPS BATCH DIM WIDTH`` prints it in MiB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

__all__ = ["peak_rss_growth_mib"]


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
