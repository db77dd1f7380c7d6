"""Shared pieces for strategies that implement their own backward pass.

Rule: a custom ``autograd.Function`` takes the field's parameters as
*explicit inputs* and returns their gradients from ``backward``, so DDP's reducer hooks
fire. Which tensors those are is found before the solve (:mod:`nde_zoo.driver.fields`);
:func:`check_no_hidden_inputs` is the backstop in backward for one that still escaped (read
only on a branch the forward check did not take).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# NonDeterministicFieldError is re-exported: the determinism check moved to nde_zoo.driver.fields.
from nde_zoo.driver.fields import NonDeterministicFieldError, graph_nodes

__all__ = ["_detached", "_identity", "NonDeterministicFieldError", "check_no_hidden_inputs", "vjp"]


def _detached(tensor: Tensor) -> Tensor:
    """Pack hook of the identity pair that shadows an outer ``SavedBytes`` during a forward solve.

    It must not return the tensor itself: a saved *output* (tanh, sigmoid and SiLU save theirs,
    e.g. inside a CNF field that takes its own derivatives) would then hold its own ``grad_fn``, a
    reference cycle no collector frees, and each solve would leak its field graphs (measured: a
    concat-squash CNF under Reversible grew 146 MB per 20 training steps). PyTorch's docs of
    ``saved_tensors_hooks`` prescribe ``x.detach()``.
    """
    return tensor.detach()


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def check_no_hidden_inputs(output: Tensor, allowed: Sequence[Tensor], strategy: str) -> None:
    """Raise if ``output``'s graph reaches a leaf requiring grad outside ``allowed``.

    Call it once per backward pass on a field output recomputed with a graph from
    ``allowed`` inputs (the state and the field's parameters).
    """
    allowed_ids = {id(t) for t in allowed}
    for node in graph_nodes(output):
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in allowed_ids:
            raise RuntimeError(
                f"the vector field depends on a tensor of shape {tuple(variable.shape)} that requires "
                f"grad but is neither the state nor one of the field's parameters; strategy "
                f"{strategy!r} computes its own backward pass and would drop that gradient. Register "
                f"it as an nn.Parameter (or a submodule) of the field, or pass it through the state "
                f"(docs/extending.md, 'Your own vector field', shows both)"
            )


def vjp(
    output: Tensor, inputs: Sequence[Tensor], cotangent: Tensor
) -> tuple[Tensor | None, ...]:
    """``cotangent^T d output / d inputs`` for each input (``None`` where unused)."""
    return torch.autograd.grad(output, inputs, cotangent, allow_unused=True)
