"""A field with Python side effects, traced once into a pure graph a compiled solve can loop over.

A compiled solve runs the field inside ``scan``, a higher-order operator that must capture the
field as a pure function of its tensors. A field that changes Python state on each call (a counter
``self.nfe += 1``, as in torchdiffeq's examples) or prints cannot be captured there. Such a field
(an ``nn.Module``) is traced once, with fake tensors (``make_fx``), into a graph of tensor operations
of its parameters, buffers, ``t`` and ``y``, and the solve compiles that graph:

- its side effects run when it is traced and checked (three calls), not at each evaluation: count
  evaluations with the strategy's own NFE (``solution.stats.nfe_forward``, the ``nfe/forward`` metric);
- a field whose output depends on the Python state it changes is not traced (the compiled solve
  would replay one value of it): it runs eagerly, with a warning naming the attributes;
- the plain Python values the field reads (``self.training``, a float set in ``__init__``) are
  checked at every solve: a change traces it again, as Dynamo's guards would recompile.

Where the field cannot be traced either (a branch on a tensor's value, ``.item()``, a NumPy call),
:func:`diagnose` names the construct, the file and line, and the fix, for the fall-back warning.
"""

from __future__ import annotations

import inspect
import linecache
import os
import re
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TracedField", "trace_field", "FieldTraceError", "plain_state"]


class FieldTraceError(RuntimeError):
    """The field cannot be traced into a pure graph; the message names the construct, line and fix."""


class TracedField(nn.Module):
    """``field`` as a traced graph: called like the field, with the field's current parameters and
    buffers (so gradients reach them and training updates are seen), never its Python code."""

    def __init__(self, field: nn.Module, graph: Callable[..., Tensor], state: dict[tuple[str, str], Any]) -> None:
        super().__init__()
        self.original = field
        self.graph = graph
        self.plain = state  # the plain Python values it read when traced (a change traces again)

    def tensors(self, params: Sequence[Tensor] = (), names: Sequence[str] = ()) -> dict[str, Tensor]:
        """The field's parameters and buffers by name, ``params`` in place of those ``names``."""
        state = {**dict(self.original.named_parameters()), **dict(self.original.named_buffers())}
        state.update(zip(names, params))
        return state

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.graph(self.tensors(), t, y)


def plain_state(field: nn.Module) -> dict[tuple[str, str], Any]:
    """The plain Python values (bool, int, float, str, None) of every submodule's attributes."""
    return {(prefix, name): value for prefix, module in field.named_modules()
            for name, value in vars(module).items()
            if isinstance(value, (bool, int, float, str, type(None))) and not name.startswith("__")}


def trace_field(field: nn.Module, t: Tensor, y: Tensor) -> TracedField:
    """Trace ``field(t, y)`` into a :class:`TracedField`; :class:`FieldTraceError` when it cannot be.

    The traced graph is checked against two eager calls of the field (to round-off): a field whose
    output changes from call to call (it depends on state it changes, or on randomness) is refused;
    so is one that reads a tensor it does not own (not a parameter or buffer: tracing with fake tensors
    stops there, and a graph holding it as a constant would lose its gradient).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from nde_zoo._torch_compat import suspended_saved_tensors_hooks

    before = plain_state(field)

    def pure(tensors: dict[str, Tensor], t: Tensor, y: Tensor) -> Tensor:
        return torch.func.functional_call(field, tensors, (t, y), strict=False)

    tensors = {**dict(field.named_parameters()), **dict(field.named_buffers())}
    try:
        with suspended_saved_tensors_hooks():
            graph = make_fx(pure, tracing_mode="fake", record_stack_traces=True)(tensors, t, y)
    except Exception as error:  # noqa: BLE001 - any failure to trace: say where and why
        raise FieldTraceError(diagnose(field, error)) from error
    for node in graph.graph.nodes:  # a value read into Python (.item(), float(tensor)) traces, but no loop takes it
        if node.op == "call_function" and "_local_scalar_dense" in str(node.target):
            raise FieldTraceError(_at_line(field, node.meta.get("stack_trace") or "", "`.item()` reads a tensor's "
                                           "value into Python", "keep the value a tensor (a 0-d tensor broadcasts), "
                                           "or use compile=False"))
    first, traced, second = (out.detach() for out in (field(t, y), graph(tensors, t, y), field(t, y)))
    changed = sorted(f"{prefix + '.' if prefix else ''}{name}" for (prefix, name), value in plain_state(field).items()
                     if before.get((prefix, name), value) != value)
    tolerance = dict(rtol=1e-10, atol=0.0) if y.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    if not (torch.allclose(first, second, **tolerance) and torch.allclose(first, traced, **tolerance)):
        depends = f" (it changes {', '.join(changed)})" if changed else " (or on randomness)"
        raise FieldTraceError(
            f"the output of {type(field).__name__}.forward depends on Python state it changes on each call"
            f"{depends}, which a compiled loop cannot replay. Fix: make the output a function of t, y and the "
            f"parameters only, or use compile=False")
    state = {key: value for key, value in plain_state(field).items() if key not in before or before[key] == value}
    return TracedField(field, graph, state)


#: what to do about each construct a field cannot be traced through, by what its line shows.
_CONSTRUCTS = (
    (lambda line: ".item()" in line, "`.item()` reads a tensor's value into Python",
     "keep the value a tensor (a 0-d tensor broadcasts), or use compile=False"),
    (lambda line: "numpy" in line or "np." in line, "a NumPy call on a tensor",
     "use the torch function of the same name on the tensor, or use compile=False"),
    (lambda line: line.lstrip().startswith(("if ", "elif ", "while ", "assert ")) or " if " in line,
     "a branch on a tensor's value", "compute both sides and choose with torch.where(condition, a, b), or use "
     "compile=False"),
    (lambda line: any(f"{cast}(" in line for cast in ("float", "int", "bool")),
     "a tensor's value converted to a Python number", "keep the value a tensor, or use compile=False"),
)


def diagnose(field: Any, error: BaseException) -> str:
    """The construct in ``field`` that ``error`` (raised while tracing it) stopped at: what it is,
    its file and line, and the fix; the error itself where no line of the field's is found."""
    frame = _field_frame(field, error)
    message = f"{type(error).__name__}: {next((s for s in str(error).splitlines() if s.strip()), '')[:300]}"
    if frame is None:
        return f"{type(field).__name__} could not be traced ({message})"
    line = (frame.line or "").strip()
    where = f"{os.path.basename(frame.filename)}:{frame.lineno} (`{line}`)"
    if "convert all Tensors to FakeTensors" in str(error):  # a real tensor met in a fake trace
        return (f"a tensor {type(field).__name__} reads but does not own (not a parameter or buffer) at {where}. "
                f"Fix: register it on the module (nn.Parameter, or register_buffer), or use compile=False")
    for matches, construct, fix in _CONSTRUCTS:
        if matches(line):
            return f"{construct} at {where}. Fix: {fix}"
    return f"{type(field).__name__} could not be traced at {where}: {message}"


#: frames in these folders are torch's or ours, never the line of a user's field to point at.
_LIBRARIES = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _source_file(field: Any) -> str:
    target = field.forward if isinstance(field, nn.Module) else field
    try:
        return os.path.realpath(inspect.getsourcefile(inspect.unwrap(target)) or "")
    except TypeError:
        return ""


def _field_frame(field: Any, error: BaseException) -> traceback.FrameSummary | None:
    """The last frame of the error's traceback in the field's own source file (else outside torch
    and nde_zoo)."""
    source = _source_file(field)
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if source and os.path.realpath(frame.filename) == source:
            return frame
    return next((f for f in reversed(frames) if not f.filename.startswith(_LIBRARIES) and "<" not in f.filename), None)


def _at_line(field: Any, stack: str, construct: str, fix: str) -> str:
    """``construct at file:line (`code`). Fix: fix`` for the field's own frame in a recorded stack."""
    source = _source_file(field)
    frames = re.findall(r'File "([^"]+)", line (\d+)', stack)
    own = [(f, int(n)) for f, n in frames if source and os.path.realpath(f) == source] or \
        [(f, int(n)) for f, n in frames if not f.startswith(_LIBRARIES)]
    if not own:
        return f"{construct} in {type(field).__name__}. Fix: {fix}"
    filename, lineno = own[-1]
    code = linecache.getline(filename, lineno).strip()
    return f"{construct} at {os.path.basename(filename)}:{lineno} (`{code}`). Fix: {fix}"
