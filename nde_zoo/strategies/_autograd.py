"""Shared pieces for strategies that implement their own backward pass.

Rule (ECOSYSTEM.md 3.2): a custom ``autograd.Function`` takes the field's parameters as
*explicit inputs* and returns their gradients from ``backward``, so DDP's reducer hooks
fire. A field that closes over some other tensor requiring grad would silently lose that
gradient; :func:`check_no_hidden_inputs` turns that into an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["_detached", "_identity", "NonDeterministicFieldError", "check_deterministic", "check_no_hidden_inputs", "vjp"]


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


class NonDeterministicFieldError(RuntimeError):
    """The field gives different outputs for the same input, so a strategy that recomputes it
    would compute a wrong gradient."""


def check_deterministic(field: Any, t0: Tensor, y0: Tensor, strategy: str) -> None:
    """Refuse a non-deterministic field for a strategy that recomputes the field in backward.

    ``Checkpoint``, ``Symplectic`` and ``Reversible`` evaluate the field again during backward and
    assume it returns what it returned forward. Dropout in training mode, or noise drawn inside
    the field, breaks that and the gradient is silently wrong (measured: 13-15% off ``Direct``).
    Two checks, only when gradients are being computed: dropout modules in training mode, and two
    evaluations at ``(t0, y0)`` that differ (two extra evaluations per solve, not counted in NFE).
    """
    if not torch.is_grad_enabled():
        return
    if isinstance(field, nn.Module):
        dropouts = [name or type(field).__name__ for name, m in field.named_modules()
                    if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
        if dropouts:
            raise NonDeterministicFieldError(
                f"the vector field is non-deterministic: dropout in training mode ({', '.join(dropouts)}). "
                f"Strategy {strategy!r} recomputes the field during backward and would get a different mask, "
                f"so its gradient would be wrong. Move dropout out of the field (before or after the solve), "
                f"or use strategy=direct or adjoint, which do not replay the forward's evaluations"
            )
    with torch.no_grad():
        first, second = field(t0, y0), field(t0, y0)
    if isinstance(first, Tensor) and isinstance(second, Tensor) and first.shape == second.shape \
            and not torch.equal(first, second):
        raise NonDeterministicFieldError(
            f"the vector field is non-deterministic: two evaluations at the same (t, y) differ by up to "
            f"{float((first - second).abs().max()):.3g}. Strategy {strategy!r} recomputes the field during "
            f"backward and its gradient would be wrong. Draw any noise once per solve outside the field "
            f"(as a buffer set before the solve), or use strategy=direct"
        )


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
