"""Compiled programs: the cache, the compile log and the fall-back to eager.

Eager PyTorch pays Python dispatch on every operation; a small field with many steps spends
nearly all of its time there (docs/compile.md). The solve driver (:mod:`nde_zoo.driver.loop`)
runs a whole fixed-step loop as a ``scan`` under ``torch.compile(fullgraph=True)``, so Inductor
sees the loop at once; this module compiles and keeps those programs. Eager stays the default
and the reference; compiled results equal it to round-off (tests/test_compiled.py).

The loop is ``torch._higher_order_ops.scan``, a private API; it and the others nde_zoo uses live
in :mod:`nde_zoo._torch_compat`, each with its public alternative. The torch range this is
tested on is pinned in ``pyproject.toml``.

What this module provides:

- :class:`CompileSpec`: the ``compile=`` argument (``False``, ``True``, ``"strict"``,
  ``"reduce-overhead"``);
- :class:`Programs`: one compiled program per (kind, field type, shapes, dtype, device, scheme,
  grid), compile seconds and counts, and the fall-back to eager with one warning naming why;
- :func:`adaptive_step`: an adaptive solve's step as a compiled program;
- :func:`functional_field` and :func:`func_vjp`: the field as a pure function of its parameters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nde_zoo._torch_compat import cache_scan_graphs, compile_limits, graphs_compiled, scan, suspended_saved_tensors_hooks
from nde_zoo.driver.traced_field import FieldTraceError, TracedField, diagnose_function, plain_state, trace_field

log = logging.getLogger("nde_zoo")

#: the torch versions the compiled path is tested on (pyproject.toml's ``compile`` extra pins them).
TESTED_TORCH = ((2, 13), (2, 14))


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)

__all__ = [
    "COMPILE_CHOICES",
    "adaptive_step",
    "CompileSpec",
    "Programs",
    "functional_field",
    "func_vjp",
    "scan",
    "trainable_names",
    "functional_names",
]

COMPILE_CHOICES = (False, True, "strict", "reduce-overhead")

#: the ``torch.compile`` backend. Inductor generates the fast code; the test suite sets
#: ``NDE_ZOO_COMPILE_BACKEND=aot_eager`` for its wide correctness matrix (the same tracing, scans
#: and ``torch.func`` transforms, seconds instead of minutes to compile) and keeps Inductor for
#: one case per strategy.
BACKEND_ENV = "NDE_ZOO_COMPILE_BACKEND"



@dataclass(frozen=True)
class CompileSpec:
    """What ``compile=`` asked for.

    - ``False`` (default): eager, the reference.
    - ``True``: compile; a field or machine that cannot be compiled falls back to eager with
      one warning naming why.
    - ``"strict"``: compile, and raise instead of falling back.
    - ``"reduce-overhead"``: as ``True`` with ``torch.compile(mode="reduce-overhead")``, which
      captures fixed-step programs as CUDA graphs on a GPU (on the CPU it is plain ``True``).
    """

    enabled: bool = False
    strict: bool = False
    mode: str | None = None

    @classmethod
    def of(cls, value: Any) -> CompileSpec:
        if isinstance(value, CompileSpec):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "false", "default", "none", ""):
                value = lowered in ("true", "default")
            else:
                value = lowered
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(enabled=True)
        if value == "strict":
            return cls(enabled=True, strict=True)
        if value == "reduce-overhead":
            return cls(enabled=True, mode="reduce-overhead")
        raise ValueError(
            f"compile must be one of {', '.join(repr(c) for c in COMPILE_CHOICES)}, got {value!r}: True "
            f"compiles the fixed-step loop (falling back to eager with a warning), 'strict' raises "
            f"instead of falling back, 'reduce-overhead' adds CUDA graphs on a GPU"
        )

    def __str__(self) -> str:
        if not self.enabled:
            return "False"
        return "'strict'" if self.strict else (repr(self.mode) if self.mode else "True")


def _signature(value: Any) -> Any:
    """What a compiled program specialises on: shapes, dtypes and devices, never values."""
    if isinstance(value, Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value


def requiring_grad(value: Any) -> Any:
    """``value``'s floating-point tensors that do not require grad as leaves that do (views: nothing is
    copied); those that do are kept, with their graph."""
    return torch.utils._pytree.tree_map(
        lambda x: x.detach().requires_grad_() if isinstance(x, Tensor) and x.is_floating_point()
        and not x.requires_grad else x, value)


def _detach_all(value: Any) -> Any:
    """``value``'s tensors detached (a tree of outputs)."""
    return torch.utils._pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, value)


class Programs:
    """Compiled programs of one strategy, by key; compile time and counts; eager fall-back.

    A key is ``(kind, id(field), shapes/dtypes/devices of the inputs, extra)`` where ``extra``
    names what is baked into the program (the solver, the number of steps, the output layout).
    Each key compiles once: a smaller last batch adds one key, not a compile per epoch.

    Attributes:
        compiles: how many programs were compiled (cache misses that compiled).
        compile_seconds: the first-call time of each of those, summed (compile plus one run).
        pending_seconds: compile seconds not yet logged (``compile/seconds``; the strategy logs
            and clears them at the end of a training batch).
        fallbacks: ``{reason: count}`` of keys that fell back to eager.
        run_seconds: wall time of the calls of compiled programs after their first (Dynamo's
            guards and dispatch included); a solve's time less this is the driver's own (checks,
            bookkeeping, the field's probe). ``bench compiled`` reports that share.
    """

    def __init__(self, spec: CompileSpec, strategy: str) -> None:
        self.spec = spec
        self.strategy = strategy
        self._programs: dict[Any, Callable[..., Any]] = {}
        self._failed: dict[Any, str] = {}
        self._warned: set[str] = set()
        self.compiles = 0
        self.compile_seconds = 0.0
        self.pending_seconds = 0.0
        self.run_seconds = 0.0
        self.fallbacks: dict[str, int] = {}
        self._traced: dict[Any, tuple[weakref.ref[nn.Module], TracedField]] = {}  # key -> (field, its graph)
        self._traced_types: set[type] = set()  # field classes that compile only traced

    def __getstate__(self) -> dict[str, Any]:  # compiled callables do not pickle (DDP spawn, deepcopy)
        state = self.__dict__.copy()
        state["_programs"], state["_failed"], state["_traced"] = {}, {}, {}
        return state

    def key(self, kind: str, field: Any, inputs: Sequence[Any], extra: Any = None) -> Any:
        # The field is an argument of every program, not baked in: a model that builds a new
        # field per batch (a CDE's ControlledField over that batch's path) reuses the program.
        return (kind, type(field), _signature(list(inputs)), extra)

    def _supported(self, key: Any) -> bool:
        """Refuse (strict) or fall back where this torch cannot run the programs; warn once
        where it is outside the tested range."""
        version = _torch_version()
        if scan is None:
            reason = f"torch {torch.__version__} has no torch._higher_order_ops.scan (compiled solves need >= 2.6)"
            if self.spec.strict:
                raise RuntimeError(f"compile='strict': {reason}")
            self._failed[key] = reason
            self._warn(reason)
            return False
        if not (TESTED_TORCH[0] <= version < TESTED_TORCH[1]):
            self._warn(
                f"torch {torch.__version__} is outside the range the compiled path is tested on "
                f"(>= {TESTED_TORCH[0][0]}.{TESTED_TORCH[0][1]}, < {TESTED_TORCH[1][0]}.{TESTED_TORCH[1][1]}; "
                f"pip install 'nde-zoo[compile]'); compiling anyway"
            )
        return True

    def _warn(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"strategy {self.strategy!r}: {reason}", RuntimeWarning, stacklevel=4)

    def padded_batch(self, key: Any) -> int | None:
        """The smallest batch larger than ``key``'s (its first input's first dimension) of a compiled
        program that is ``key`` but for that batch: a ragged last batch can run it padded."""
        kind, field_type, signature, extra = key
        first = signature[0] if signature else None
        if not (isinstance(first, tuple) and first and first[0] == "T" and first[1]):
            return None
        sizes = [other[2][0][1][0] for other in self._programs
                 if other[0] == kind and other[1] is field_type and other[3] == extra and other[2][1:] == signature[1:]
                 and other[2][0][0] == "T" and other[2][0][2:] == first[2:] and other[2][0][1][1:] == first[1][1:]
                 and other[2][0][1][0] > first[1][0]]
        return min(sizes) if sizes else None

    def compiled(self, key: Any) -> bool:
        """Whether ``key`` has a compiled program (it compiled and did not fall back)."""
        return key in self._programs

    def first_call(self, key: Any) -> bool:
        """Whether ``key`` has neither compiled nor failed yet (its first call will compile)."""
        return key not in self._programs and key not in self._failed

    def run(self, key: Any, build: Callable[[], Callable[..., Any]], *args: Any,
            example: tuple[Tensor, Tensor] | None = None) -> Any | None:
        """Run the program for ``key`` on ``args``; ``None`` when it runs eager instead.

        ``build()`` returns the plain Python function to compile; it is called once per key.
        Its first argument is the field (``args[0]``), passed on every call.
        The first call of a key compiles (timed). A failure there is a compile failure (graph
        break, unsupported operation, no C++ compiler). A module field that failed is then traced
        into a pure graph (:mod:`nde_zoo.driver.traced_field`; ``example`` is a ``(t, y)`` to
        trace it at) and compiled as that; if that fails too, it warns once per reason, naming
        the construct, and the key runs eager from then on, or raises with ``compile="strict"``.
        """
        if key in self._failed:
            return None
        field = args[0]
        program = self._programs.get(key)
        if program is not None:
            if key in self._traced:
                traced = self._traced_for(key, field, example)
                if traced is None:
                    return None
                args = (traced, *args[1:])
            # A call whose guards fail (a field whose submodule was swapped, ...) compiles again
            # inside torch: count and time it as a compile too.
            graphs = graphs_compiled()
            start = time.perf_counter()
            with compile_limits():  # a guard failure recompiles inside this call
                result = program(*args)
            seconds = time.perf_counter() - start
            if graphs_compiled() != graphs:
                self._count(seconds)
            else:
                self.run_seconds += seconds
            return result
        if not self._supported(key):
            return None
        # Compiling takes seconds to minutes, once per key: say so before, and how long after,
        # so a long first step is never silent.
        field_type = getattr(key[1], "__name__", str(key[1]))
        field_type = "a function field" if field_type in ("function", "method", "partial") else field_type
        what = f"its {key[0]} program for {field_type} on {_describe_signature(key[2])}"
        log.info("strategy %r: compiling %s (once per shape; compile=False skips this) ...", self.strategy, what)
        start = time.perf_counter()
        traceable = isinstance(field, nn.Module) and example is not None
        try:
            if traceable and type(field) in self._traced_types:  # known to need tracing: skip the failure
                raise _NeedsTracing("its class compiles only traced into a graph")
            compiled, result = self._compile(build, args)
        except Exception as error:  # noqa: BLE001 - any failure to compile means: trace, or run eager
            reason = str(error) if isinstance(error, _NeedsTracing) else _reason(error)
            compiled = result = None
            if traceable:
                reason, compiled, result = self._compile_traced(key, build, args, example, reason)
            elif example is not None and not isinstance(field, nn.Module):
                reason = diagnose_function(field, *example, error) or reason
            if compiled is None:
                self._fall_back(key, reason, error)
                return None
        self._programs[key] = compiled
        seconds = time.perf_counter() - start
        log.info("strategy %r: compiled %s in %.1f s", self.strategy, what, seconds)
        self._count(seconds)
        return result

    def _compile(self, build: Callable[[], Callable[..., Any]], args: Sequence[Any]) -> tuple[Any, Any]:
        """Compile ``build()`` and run it on ``args`` (the first call compiles): ``(program, result)``."""
        backend = os.environ.get(BACKEND_ENV, "inductor")
        mode = self.spec.mode if backend == "inductor" else None
        options = None
        if backend == "inductor" and mode is None and _on_cpu(args):
            # Inductor's C++ wrapper runs the scan's loop in C++ instead of Python: measured 2-5x
            # faster per step on the white dwarf (docs/compile.md). Built separately, the wrapper
            # compiles at -O1 and only the kernels at -O3: gcc at -O3 on one file holding both
            # took 537 of the CNF's 640 s cold compile, 55 s so (no slower per step; measured).
            options = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
        if backend == "inductor":
            cache_scan_graphs()  # a second process then loads these programs instead of deriving them again
        compiled = torch.compile(build(), fullgraph=True, dynamic=False, backend=backend, mode=mode, options=options)
        with _without_saved_tensors_hooks(), compile_limits():
            return compiled, compiled(*args)

    def _compile_traced(self, key: Any, build: Callable[[], Callable[..., Any]], args: Sequence[Any],
                        example: Any, reason: str) -> tuple[str, Any, Any]:
        """The field traced into a pure graph, compiled: ``(reason, program, result)``, the program
        ``None`` (and the reason why) when it cannot be traced or still does not compile."""
        field = args[0]
        try:
            traced = trace_field(field, *example)
        except FieldTraceError as error:
            return str(error), None, None
        try:
            compiled, result = self._compile(build, (traced, *args[1:]))
        except Exception as error:  # noqa: BLE001
            traced_reason = _reason(error)
            again = "the same" if traced_reason == reason else traced_reason
            return f"{reason} (traced into a graph: {again})", None, None
        self._traced[key] = (weakref.ref(field), traced)
        self._traced_types.add(type(field))
        log.info("strategy %r: %s did not compile as written (%s), so the solve compiles it traced into a graph "
                 "instead: any Python side effects of its forward ran when it was traced, not at each evaluation "
                 "(the strategy's NFE counts evaluations)", self.strategy, type(field).__name__, reason)
        return reason, compiled, result

    def _traced_for(self, key: Any, field: nn.Module, example: Any) -> TracedField | None:
        """The traced graph of ``field`` for ``key``: traced again for another field object, or when a
        plain value it read changed (``training``, ...); ``None`` (run eager) if that fails."""
        ref, traced = self._traced[key]
        current = plain_state(field)
        if ref() is not field or any(current.get(name, _MISSING) != value for name, value in traced.plain.items()):
            try:
                traced = trace_field(field, *example)
            except FieldTraceError as error:
                self._fall_back(key, str(error), error)
                return None
            self._traced[key] = (weakref.ref(field), traced)
        return traced

    def _fall_back(self, key: Any, reason: str, error: BaseException) -> None:
        """Run ``key`` eagerly from now on, warning once per reason (``strict``: raise instead)."""
        if self.spec.strict:
            raise RuntimeError(
                f"compile='strict': strategy {self.strategy!r} could not compile its solve: {reason}. "
                f"Make the field compilable (no data-dependent Python control flow, no .item(), "
                f"no unsupported operations), or use compile=True to fall back to eager with a warning"
            ) from error
        self._failed[key] = reason
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"strategy {self.strategy!r} could not compile its solve and runs it eagerly instead "
                f"(same gradients, slower): {reason}. compile='strict' raises instead of falling back",
                RuntimeWarning,
                stacklevel=4,
            )

    def _count(self, seconds: float) -> None:
        """One program compiled, in ``seconds`` (its first call's time)."""
        self.compiles += 1
        self.compile_seconds += seconds
        self.pending_seconds += seconds


def adaptive_step(
    programs: Programs,
    kind: str,
    field: Any,
    make_step: Callable[[Any], Callable[..., Any]],
    counted: Any,
    evaluations: Callable[[Any], int],
    extra: Any = None,
    example: tuple[Tensor, Tensor] | None = None,
    differentiated: bool = False,
) -> Callable[..., Any]:
    """An adaptive solve's step as a compiled program; the controller stays in Python.

    Args:
        make_step: ``make_step(f) -> step(t, state, h, carry)`` for a field ``f``: the eager
            loop's step factory. The compiled program is built from the raw ``field`` (stable
            across solves, so it is reused); the eager fall-back from ``counted``.
        counted: the solve's :class:`~nde_zoo.solvers.CountedField`; a compiled call adds
            ``evaluations(carry)`` to its ``nfe`` (the program cannot count from inside).
        extra: what else the program bakes in (the solver, the coupling).
        example: a ``(t, y)`` to trace a field with side effects at (:meth:`Programs.run`).
        differentiated: the step is differentiated by autograd (Direct). Its program is then always
            the one with a graph, its state and carry leaves requiring grad where they do not: a pass
            without gradients (validation, Lightning's sanity check before any training) runs it
            and drops the graph, so training and validation share one program, whichever comes first.

    The step size enters as a 0-d tensor, so accepting and rejecting steps of every size
    reuses one program per (shapes, dtype, grad mode). ``Path.sizes`` keep the Python floats.
    """
    eager = make_step(counted)

    def build() -> Callable[..., Any]:
        return lambda f, t, state, h, carry: make_step(f)(t, state, h, carry)

    def step(t: Tensor, state: Any, h: float, carry: Any) -> Any:
        graded = False
        if differentiated:  # one program with its graph for training, validation and the sanity check
            graded, state, carry = not torch.is_grad_enabled(), requiring_grad(state), requiring_grad(carry)
        key = programs.key(kind, field, [t, state, carry], (extra, differentiated or torch.is_grad_enabled()))
        with torch.enable_grad() if graded else contextlib.nullcontext():
            if programs.first_call(key):
                return_eager = eager(t, state, h, carry)  # the first step runs eagerly: it checks shapes
                programs.run(key, build, field, t, state, t.new_tensor(h), carry, example=example)  # compile only
                return _detach_all(return_eager) if graded else return_eager
            result = programs.run(key, build, field, t, state, t.new_tensor(h), carry, example=example)
        if result is None:
            return eager(t, state, h, carry)
        counted.nfe += evaluations(carry)
        return _detach_all(result) if graded else result

    return step


#: Lift every saved-tensors hook while a program is traced and compiled (``torch.func``
#: transforms refuse to trace under them; the strategies count saved bytes with them). The
#: compiled program itself runs under the hooks as usual from its second call on; the first
#: call's result is what it computed, without the outer hooks seeing what it saved.
_without_saved_tensors_hooks = suspended_saved_tensors_hooks


_MISSING = object()  # an attribute the field no longer has


class _NeedsTracing(Exception):
    """A field class that already failed to compile plainly: go straight to tracing it."""


def _describe_signature(signature: Any) -> str:
    """``(2, 3) float64 cpu, ...``: the tensors of a key's input signature (for the log)."""
    tensors = []

    def visit(item: Any) -> None:
        if isinstance(item, tuple) and len(item) == 5 and item[0] == "T":
            tensors.append(f"{item[1]} {str(item[2]).replace('torch.', '')} {item[3]}")
        elif isinstance(item, tuple):
            for sub in item:
                visit(sub)

    visit(signature)
    return ", ".join(tensors) if tensors else "its inputs"


def _on_cpu(args: Sequence[Any]) -> bool:
    """Whether the program's tensor inputs live on the CPU (the first tensor decides)."""
    for value in args:
        if isinstance(value, Tensor):
            return value.device.type == "cpu"
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
            return value[0].device.type == "cpu"
    return True


#: what to do about the graph breaks users meet most, by a phrase of torch's message.
_BREAK_HINTS = {
    "outer-scope object was changed": (
        "the field changes Python state on each call (e.g. a counter, nfe += 1), which a compiled loop "
        "cannot replay; an nn.Module field is traced into a pure graph instead, a function field is not: "
        "write it as an nn.Module, or drop the counter (the strategy counts evaluations: "
        "solution.stats.nfe_forward, the nfe/forward metric)"
    ),
    "input mutation during higher order op": (
        "the field changes a tensor in place at each call (a BatchNorm in training mode updating its running "
        "statistics, or an in-place operation on a buffer or an input), which a compiled loop cannot replay: "
        "solve with the field in eval mode, or BatchNorm(track_running_stats=False), or write the update out of "
        "place, or use compile=False"
    ),
}


def _reason(error: BaseException) -> str:
    """One line that names why compilation failed: the outermost error, its root cause with
    torch's own explanation (a higher-order op's error puts it only in its cause), and a fix
    for the graph breaks users meet most."""

    def line(e: BaseException, explain: bool = True) -> str:
        text = str(e).strip()
        first = next((t.strip() for t in text.splitlines() if t.strip()), "")
        explanation = next((t.split("Explanation:", 1)[1].strip() for t in text.splitlines() if "Explanation:" in t), "")
        if explain and explanation and explanation not in first:
            first = f"{first.rstrip('.:')}: {explanation}" if first else explanation
        return f"{type(e).__name__}: {first[:400]}" if first else type(e).__name__

    chain = [error]
    while len(chain) < 16:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    root = chain[-1]
    reason = line(error) if root is error else f"{line(error, explain=False)} (cause: {line(root)})"
    text = " ".join(str(e) for e in chain)
    hints = [hint for phrase, hint in _BREAK_HINTS.items() if phrase in text]
    return f"{reason}. Fix: {hints[0]}" if hints else reason


def functional_field(field: Any, names: Sequence[str]) -> Callable[[Sequence[Tensor], Tensor, Tensor], Tensor]:
    """``f(params, t, y)``: the field with its trainable parameters passed explicitly.

    ``names`` are the names of the parameters (``field.named_parameters()`` order, trainable
    only); the others (frozen parameters, buffers) stay those of the module.
    """
    if isinstance(field, TracedField):  # the traced graph, the original's names
        return lambda params, t, y: field.graph(field.tensors(params, names), t, y)
    if not isinstance(field, nn.Module) or not names:
        return lambda params, t, y: field(t, y)

    def call(params: Sequence[Tensor], t: Tensor, y: Tensor) -> Tensor:
        return torch.func.functional_call(field, dict(zip(names, params)), (t, y), strict=False)

    return call


def trainable_names(field: Any) -> list[str]:
    """The names of the trainable parameters, in :func:`field_parameters` order."""
    if not isinstance(field, nn.Module):
        return []
    return [n for n, p in field.named_parameters() if p.requires_grad]


def functional_names(programs: Programs, field: Any, params: Sequence[Tensor]) -> list[str] | None:
    """The names under which a compiled backward passes ``params`` to the field, or ``None`` (and a
    warning, once) when they are not exactly the module's trainable parameters: a closure, or a
    module that also reads tensors outside itself, cannot take them functionally, so that backward
    runs eagerly (the same gradients)."""
    names = trainable_names(field)
    if len(names) == len(params):
        return names
    programs._warn(
        f"the field ({type(field).__name__}) reads {len(params)} trainable tensors, of which {len(names)} are "
        f"its own module parameters (a closure, a partial, or a module reading tensors outside itself): the "
        f"compiled backward passes parameters functionally and cannot take these, so the backward runs eagerly "
        f"(same gradients). Write the field as an nn.Module that owns every parameter it reads to compile it"
    )
    return None


def func_vjp(
    fn: Callable[[Tensor, Sequence[Tensor]], Tensor], x: Tensor, params: Sequence[Tensor], cotangent: Tensor
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(fn(x, params), cot^T d fn/dx, cot^T d fn/dparams)`` by ``torch.func.vjp``.

    The compiled counterpart of ``torch.autograd.grad`` in the eager backward loops: pure,
    so it traces into a scan body. Unused parameters get zeros (not ``None``).
    """
    out, pullback = torch.func.vjp(fn, x, tuple(params))
    xbar, pbars = pullback(cotangent)
    return out, xbar, tuple(pbars)
