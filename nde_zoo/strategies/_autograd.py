"""Shared pieces for strategies that implement their own backward pass.

Rule (ECOSYSTEM.md 3.2): a custom ``autograd.Function`` takes the field's parameters as
*explicit inputs* and returns their gradients from ``backward``, so DDP's reducer hooks
fire. A field that closes over some other tensor requiring grad would silently lose that
gradient; :func:`check_no_hidden_inputs` turns that into an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_no_hidden_inputs", "vjp"]


def check_no_hidden_inputs(output: Tensor, allowed: Sequence[Tensor], strategy: str) -> None:
    """Raise if ``output``'s graph reaches a leaf requiring grad outside ``allowed``.

    Call it once per backward pass on a field output recomputed with a graph from
    ``allowed`` inputs (the state and the field's parameters).
    """
    if output.grad_fn is None:
        return
    allowed_ids = {id(t) for t in allowed}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in allowed_ids:
            raise RuntimeError(
                f"the vector field depends on a tensor of shape {tuple(variable.shape)} that requires "
                f"grad but is neither the state nor one of the field's parameters; strategy "
                f"{strategy!r} computes its own backward pass and would drop that gradient. Register "
                f"it as an nn.Parameter (or a submodule) of the field, or pass it through the state "
                f"(docs/extending.md, 'Your own vector field', shows both)"
            )
        stack.extend(next_fn for next_fn, _ in node.next_functions)


def vjp(
    output: Tensor, inputs: Sequence[Tensor], cotangent: Tensor
) -> tuple[Tensor | None, ...]:
    """``cotangent^T d output / d inputs`` for each input (``None`` where unused)."""
    return torch.autograd.grad(output, inputs, cotangent, allow_unused=True)
