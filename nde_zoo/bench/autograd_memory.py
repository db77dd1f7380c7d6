"""How many bytes autograd holds for backward at once: the CPU's measure of a gradient's memory.

:class:`LiveSaved` installs ``saved_tensors_hooks`` that count each saved storage once
while something references it, so a backward pass that recomputes (checkpointing) or
rebuilds (reversible, symplectic) its graphs step by step shows its true high-water mark,
not only what the forward pass left behind (``Solution.saved_bytes``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LiveSaved", "peak_autograd_bytes"]


class LiveSaved:
    """Peak bytes of storages autograd holds for backward *at once*, each storage counted once.

    The parameters' storages (``ignore``) are left out: they exist whether or not a graph does.
    """

    def __init__(self, ignore: list[Tensor]) -> None:
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [references held, bytes]
        self.live = 0
        self.peak = 0
        ignored = {t.untyped_storage().data_ptr() for t in ignore}
        outer = self

        class Held:
            def __init__(self, tensor: Tensor) -> None:
                # A detached alias: same storage, but no strong reference back to an output's
                # grad_fn (that cycle would keep the graph alive and inflate the count).
                self.tensor = tensor.detach()
                storage = tensor.untyped_storage()
                self.ptr = None if storage.data_ptr() in ignored else storage.data_ptr()
                if self.ptr is not None:
                    entry = outer.refs.setdefault(self.ptr, [0, storage.nbytes()])
                    if entry[0] == 0:
                        outer.live += entry[1]
                        outer.peak = max(outer.peak, outer.live)
                    entry[0] += 1

            def __del__(self) -> None:
                if self.ptr is not None:
                    entry = outer.refs[self.ptr]
                    entry[0] -= 1
                    if entry[0] == 0:
                        outer.live -= entry[1]
                        del outer.refs[self.ptr]

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor)


def peak_autograd_bytes(loss: Tensor, kept: int, ignore: list[Tensor]) -> int:
    """Run ``loss.backward()`` and return ``kept`` (what the forward pass left for backward)
    plus the most that the backward pass held at once on top; ``ignore``: the parameters."""
    live = LiveSaved(ignore)
    with live.hooks:
        loss.backward()
    return kept + live.peak
