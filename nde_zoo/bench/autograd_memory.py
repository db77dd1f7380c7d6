"""How many bytes autograd holds for backward at once: the CPU's measure of a gradient's memory.

:class:`LiveSaved` installs ``saved_tensors_hooks`` that count each saved storage once
while something references it, so a backward pass that recomputes (checkpointing) or
rebuilds (reversible, symplectic) its graphs step by step shows its true high-water mark,
not only what the forward pass left behind (``Solution.saved_bytes``).
"""

from __future__ import annotations

from torch import Tensor

from nde_zoo.memory import LiveSaved

__all__ = ["LiveSaved", "peak_autograd_bytes"]


def peak_autograd_bytes(loss: Tensor, kept: int, ignore: list[Tensor]) -> int:
    """Run ``loss.backward()`` and return ``kept`` (what the forward pass left for backward)
    plus the most that the backward pass held at once on top; ``ignore``: the parameters.

    What the strategies' own backward passes save again from the states they kept (a recomputed
    step's input shares the stored state's storage) is in ``kept`` already: not counted twice
    (:meth:`LiveSaved.kept_by`).
    """
    live = LiveSaved(ignore + LiveSaved.kept_by(loss))
    with live.hooks:
        loss.backward()
    return kept + live.peak
