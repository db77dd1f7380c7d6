"""What a vector field depends on: its parameters, found however the field is written.

Strategies with a backward pass of their own (``Checkpoint``, ``Reversible``, ``Symplectic``)
and the continuous adjoints (torchdiffeq's ``odeint_adjoint``) return gradients only for the
tensors they are *given* as inputs. Autograd cannot tell them which tensors a Python callable
reads, so a field written as a closure over a module (``lambda t, y: net(y)``) used to lose its
parameter gradients without a word. Two complementary searches close that gap:

1. **Static**: :func:`field_parameters` looks through how the callable is built: an
   ``nn.Module``'s parameters; a bound method's ``__self__``; a ``functools.partial``'s function
   and arguments; a function's closure cells, defaults and the globals its code names; the
   attributes of a callable object. This finds parameters used only on some branches.
2. **Dynamic**: :func:`inspect_field` evaluates the field once at ``(t0, y0)`` with a graph and
   walks that graph to its leaves: every leaf tensor that requires grad is an input of the
   solve, wherever the field found it (a global, a cell, a module attribute).

Their union is what the strategy differentiates. What cannot be recomputed exactly is refused
at the solve, before any step, with the fix named (:class:`FieldDependencyError`): a tensor the
field reads that was *computed* from parameters outside it (the strategy would have to
differentiate through a graph that is not its own). ``params=`` on ``solve`` (like torchdiffeq's
``adjoint_params``) names the parameters explicitly; the graph walk still adds any it missed.

:func:`inspect_field` is also where non-finite input is named as such (a NaN in ``y0``, a field
that returns NaN at a finite state), and where a recomputing strategy refuses a
non-deterministic field.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nde_zoo._torch_compat import DropoutBase
from nde_zoo.solvers import NonFiniteStateError

__all__ = [
    "FieldDependencyError",
    "NonDeterministicFieldError",
    "check_finite_initial_state",
    "field_parameters",
    "inspect_field",
]

#: how deep :func:`field_parameters` follows references (a closure over a partial over a module is 3).
MAX_SEARCH_DEPTH = 6


class FieldDependencyError(RuntimeError):
    """The field depends on a tensor that the strategy cannot differentiate through."""


class NonDeterministicFieldError(RuntimeError):
    """The field gives different outputs for the same input, so a strategy that recomputes it
    would compute a wrong gradient."""


def field_parameters(field: Any, params: Sequence[Tensor] | None = None) -> list[Tensor]:
    """The trainable tensors a field reads, found statically (no evaluation).

    Args:
        field: an ``nn.Module``, a bound method of one, a ``functools.partial``, a function or
            lambda (closure cells, defaults and the module globals its code names are searched),
            or a callable object (its attributes are searched).
        params: given explicitly (torchdiffeq's ``adjoint_params``): returned as they are, less
            those that do not require grad; no search.

    Returns:
        distinct tensors that require grad and are leaves (parameters), in a fixed order: a
        module's ``parameters()`` order first, so a module field's list is exactly its trainable
        parameters (the compiled path relies on that).
    """
    if params is not None:
        found = []
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params= must be tensors (the field's parameters), got {type(p).__name__} at index {i}")
            found.append(p)
        return _distinct(p for p in found if p.requires_grad)
    return _distinct(_search(field, 0, set()))


def _distinct(tensors: Iterator[Tensor] | list[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _search(obj: Any, depth: int, seen: set[int]) -> Iterator[Tensor]:
    if depth > MAX_SEARCH_DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        yield from (p for p in obj.parameters() if p.requires_grad)
    elif isinstance(obj, Tensor):
        if obj.requires_grad and obj.is_leaf:
            yield obj
    elif isinstance(obj, functools.partial):
        yield from _search(obj.func, depth + 1, seen)
        for value in (*obj.args, *obj.keywords.values()):
            yield from _search(value, depth + 1, seen)
    elif isinstance(obj, types.MethodType):
        yield from _search(obj.__self__, depth + 1, seen)
        yield from _search(obj.__func__, depth + 1, seen)
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                continue
            yield from _search(value, depth + 1, seen)
        for value in (*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()):
            yield from _search(value, depth + 1, seen)
        for name in _global_names(obj.__code__):
            if name in obj.__globals__:
                yield from _search(obj.__globals__[name], depth + 1, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            yield from _search(value, depth + 1, seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _search(value, depth + 1, seen)
    elif callable(obj) and not isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)) \
            and hasattr(obj, "__dict__"):
        for value in vars(obj).values():  # a callable object: what its __call__ can read
            yield from _search(value, depth + 1, seen)


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The global names a function's code (and the code of functions nested in it) reads."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def check_finite_initial_state(y0: Tensor, t0: float | Tensor, strategy: str) -> None:
    """Name a NaN/inf initial state as bad input (before a strategy blames the dynamics or the field)."""
    if bool(torch.isfinite(y0.detach()).all()):
        return
    t0 = float(t0.detach()) if isinstance(t0, Tensor) else t0
    finite = torch.isfinite(y0.detach().reshape(len(y0), -1)).all(dim=1) if y0.ndim else torch.isfinite(y0)
    bad = (~finite).nonzero().flatten().tolist() if finite.ndim else [0]
    raise NonFiniteStateError(
        f"the initial state y0 of the {strategy} solve is NaN or infinite at t={t0} in {len(bad)} of "
        f"{max(len(y0), 1) if y0.ndim else 1} batch entries (first: index {bad[0]}): the input data (or the encoder "
        f"that produced y0) has NaN/inf; clean or impute the data, e.g. torch.nan_to_num, or mask the missing values"
    )


def graph_nodes(output: Tensor, stop: Any = None) -> list[Any]:
    """Every autograd node reachable from ``output`` (depth first, each once), not beyond ``stop``."""
    nodes: list[Any] = []
    seen: set[int] = {id(stop)} if stop is not None else set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def _is_cast_of_leaves(node: Any) -> bool:
    """Autocast's cast of a parameter (cached across calls inside one autocast region): a shared
    node that is only a dtype copy of leaves, which a recomputation can traverse again safely."""
    if _leaf_of(node) is not None:
        return True
    if not type(node).__name__.startswith("ToCopyBackward"):
        return False
    return all(n is None or _is_cast_of_leaves(n) for n, _ in node.next_functions)


def _leaf_of(node: Any) -> Tensor | None:
    """The leaf tensor of an ``AccumulateGrad`` node (``None`` for every other node)."""
    variable = getattr(node, "variable", None)
    return variable if isinstance(variable, Tensor) else None


def inspect_field(
    field: Any,
    t0: Tensor,
    y0: Tensor,
    strategy: str,
    *,
    params: Sequence[Tensor] | None = None,
    recomputes: bool = True,
) -> list[Tensor]:
    """Check a field before a strategy solves with it; return the parameters to differentiate.

    Always: a NaN/inf ``y0`` raises :class:`~nde_zoo.solvers.NonFiniteStateError` naming the
    batch entries. With gradients on (nothing more runs under ``no_grad``):

    - the field is evaluated twice at ``(t0, y0)`` with a graph (two evaluations, not counted in
      NFE; a field that counts its own calls sees them). A NaN/inf output at this finite state is
      named as the field's (``NonFiniteStateError``), not as a blow-up of the dynamics;
    - the leaves of that graph that require grad join the statically found parameters
      (:func:`field_parameters`), so closures, globals and partials lose no gradient;
    - a graph node shared by both evaluations that is not a leaf is a tensor computed from
      parameters *outside* the field: refused (:class:`FieldDependencyError`);
    - ``recomputes``: the strategy evaluates the field again in backward, so dropout in training
      mode and two evaluations that differ are refused (:class:`NonDeterministicFieldError`).

    Args:
        field: the vector field, ``field(t, y) -> dy/dt`` of ``y``'s shape.
        t0: scalar tensor, the initial time; y0: ``(batch, *state)``.
        strategy: the strategy's name, for the messages.
        params: the parameters named by the caller (``solve(..., params=)``), or ``None`` to search.
        recomputes: whether the strategy re-evaluates the field in its backward pass.

    Returns:
        the trainable tensors to pass to the strategy's backward as explicit inputs.
    """
    check_finite_initial_state(y0, t0, strategy)
    found = field_parameters(field, params)
    if not torch.is_grad_enabled():
        return found
    if recomputes and isinstance(field, nn.Module):
        dropouts = _training_dropouts(field)
        if dropouts:
            raise NonDeterministicFieldError(
                f"the vector field is non-deterministic: dropout in training mode ({', '.join(dropouts)}). "
                f"Strategy {strategy!r} recomputes the field during backward and would get a different mask, "
                f"so its gradient would be wrong. Move dropout out of the field (before or after the solve), "
                f"or use strategy=direct or adjoint, which do not replay the forward's evaluations"
            )
    state = y0.detach()
    first, second = field(t0, state), field(t0, state)
    if not (isinstance(first, Tensor) and isinstance(second, Tensor)):
        return found  # the solver core's shape check names a non-tensor output
    if not bool(torch.isfinite(first).all()):
        raise NonFiniteStateError(
            f"the vector field returned NaN or infinity at t={float(t0.detach())} for a finite initial state: its "
            f"parameters or the tensors it reads hold NaN/inf (a diverged training step?); check the field's "
            f"weights and any data it reads (e.g. a CDE's interpolated path)"
        )
    if recomputes and first.shape == second.shape and not torch.equal(first, second):
        raise NonDeterministicFieldError(
            f"the vector field is non-deterministic: two evaluations at the same (t, y) differ by up to "
            f"{float((first - second).detach().abs().max()):.3g}. Strategy {strategy!r} recomputes the field during "
            f"backward and its gradient would be wrong. Draw any noise once per solve outside the field "
            f"(as a buffer set before the solve), or use strategy=direct"
        )
    if not first.requires_grad:
        return found
    state_storages = {state.untyped_storage().data_ptr(), t0.untyped_storage().data_ptr()}
    # The time is an input, not a dependency: its own graph (ts requiring grad) is not walked.
    first_nodes = graph_nodes(first, stop=t0.grad_fn)
    inner = {id(node) for node in first_nodes if _leaf_of(node) is None}
    for node in graph_nodes(second, stop=t0.grad_fn):
        if id(node) in inner and not _is_cast_of_leaves(node):
            raise FieldDependencyError(
                f"the vector field reads a tensor computed outside it from parameters (an autograd "
                f"'{type(node).__name__}' node that every evaluation shares). Strategy {strategy!r} "
                f"re-evaluates the field in its own backward pass and cannot differentiate through that outside "
                f"computation. Compute the tensor inside the field (an nn.Module whose forward does), pass it "
                f"through the state (docs/extending.md ('Your own vector field') shows both), or use strategy=direct"
            )
    known = {id(p) for p in found}
    for node in first_nodes:
        leaf = _leaf_of(node)
        # A leaf on the state's storage is the state itself, made to require grad inside the
        # field (a CNF taking its divergence): not a parameter.
        if leaf is None or id(leaf) in known or leaf.untyped_storage().data_ptr() in state_storages:
            continue
        known.add(id(leaf))
        found.append(leaf)
    # Probed on every solve, never remembered per field: what a field reads besides its parameters
    # (a plain tensor attribute, a global) can start requiring grad between two solves (an encoder
    # unfrozen, a context set per batch), and only a new probe sees it (tests/test_field_forms.py).
    return found


def _training_dropouts(field: Any) -> list[str]:
    """The dropout modules of ``field`` in training mode with ``p > 0`` (they draw a new mask per call)."""
    if not isinstance(field, nn.Module) or not any(
            isinstance(m, DropoutBase) and m.training and m.p > 0 for m in field.modules()):
        return []
    return [name or type(field).__name__ for name, m in field.named_modules()
            if isinstance(m, DropoutBase) and m.training and m.p > 0]
