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

__all__ = ["TracedField", "trace_field", "FieldTraceError", "plain_state", "diagnose_function"]


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
    reads = _reads_a_value(field, graph)
    if reads is not None:
        raise FieldTraceError(reads)
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


def _reads_a_value(field: Any, graph: Any) -> str | None:
    """A value read into Python (``.item()``, ``float(tensor)``) traces, but no loop takes it: its line."""
    construct, fix = "`.item()` reads a tensor's value into Python", "keep the value a tensor (a 0-d tensor " \
        "broadcasts), or use compile=False"
    for node in graph.graph.nodes:
        if node.op == "call_function" and "_local_scalar_dense" in str(node.target):
            stack = node.meta.get("stack_trace") or ""
            line = None if stack else _source_line(field, r"\.item\(\)")  # a function's trace records no stack
            return f"{construct} at {line}. Fix: {fix}" if line else _at_line(field, stack, construct, fix)
    return None


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


def diagnose_function(field: Any, t: Tensor, y: Tensor, error: BaseException) -> str | None:
    """Why a field that is a function, not an ``nn.Module``, did not compile (``error``, Dynamo's): the
    construct, its file and line, and the fix; ``None`` where none is recognised (torch's reason stands).

    A function cannot be traced into a graph of its parameters (it reads them from its closure or its
    globals, not by name), so it runs eagerly; this names why. Torch's message often lacks the line
    (``.item()`` or a NumPy call fail later, in a partitioner), so the field is first traced with fake
    tensors, which stops at the line itself (its Python side effects run once more there); failing that,
    torch's own text is matched (:data:`_COMPILE_BREAKS`).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from nde_zoo._torch_compat import suspended_saved_tensors_hooks

    try:
        with suspended_saved_tensors_hooks():
            graph = make_fx(lambda t, y: field(t, y), tracing_mode="fake", _allow_non_fake_inputs=True,
                            record_stack_traces=True)(t, y)
    except Exception as trace_error:  # noqa: BLE001 - any failure names its line
        if _field_frame(field, trace_error) is not None:
            return diagnose(field, trace_error)
    else:
        reads = _reads_a_value(field, graph)
        if reads is not None:
            return reads
    chain: list[BaseException] = [error]
    while len(chain) < 16 and (chain[-1].__cause__ or chain[-1].__context__) not in (None, *chain):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    text = "\n".join(str(e) for e in chain)
    for phrase, construct, fix, pattern in _COMPILE_BREAKS:
        if phrase in text:
            if pattern is not None:  # torch's message does not reach the field's line: find it in the source
                line = _source_line(field, pattern)
                if line is not None:
                    return f"{construct} at {line}. Fix: {fix}"
            return _at_line(field, text, construct, fix)
    return None


#: what a function field cannot compile through, by a phrase of Dynamo's message: the construct, the
#: fix, and (where Dynamo's message has no line of the field's) a pattern that finds the line.
_COMPILE_BREAKS = (
    ("aliasing during higher order op tracing",
     "a tensor the field reads from outside it, transposed with `.T` or `.mT` (torch's loop capture takes "
     "each such view as a second input aliasing the tensor, which it refuses)",
     "write `W.t()` or `W.transpose(-2, -1)` (`torch.nn.functional.linear(y, W)` for `y @ W.T`), or make the "
     "field an nn.Module owning W (it is then traced into a graph), or use compile=False", r"\.m?T\b"),
    ("Mutating a variable from outside the scope", "the field changes Python state on each call (e.g. a counter)",
     "drop it (the strategy counts evaluations: solution.stats.nfe_forward, the nfe/forward metric), or write the "
     "field as an nn.Module (its side effects then run once, when it is traced), or use compile=False", None),
    ("builtin operator `print`", "a print() call",
     "drop it (log outside the field), or write the field as an nn.Module (it then prints once, when traced), or "
     "use compile=False", None),
)


def _source_line(field: Any, pattern: str) -> str | None:
    """``file:line (`code`)`` of the first line of ``field``'s source matching ``pattern``."""
    try:
        lines, first = inspect.getsourcelines(inspect.unwrap(field))
        filename = inspect.getsourcefile(inspect.unwrap(field)) or ""
    except (OSError, TypeError):
        return None
    for offset, code in enumerate(lines):
        if re.search(pattern, code.split("#", 1)[0]):
            return f"{os.path.basename(filename)}:{first + offset} (`{code.strip()}`)"
    return None


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
