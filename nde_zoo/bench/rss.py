"""Peak resident-memory growth of one training step, measured in a fresh process.

``ru_maxrss`` is a high-water mark, so each measurement runs in its own subprocess: build
the problem, note the mark, run one forward and backward pass, report the growth.
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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chosen.solve(field, y0, ts).ys[-1].square().mean().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0  # ru_maxrss is in KiB on Linux


if __name__ == "__main__":
    name, *numbers = sys.argv[1:]
    steps, batch, dim, width = (int(x) for x in numbers)
    print(json.dumps({"growth_mib": _probe(name, steps, batch, dim, width)}))
