"""Rank helpers for what one process of a DDP job decides for all of them.

A strategy that measures (``strategy=auto``) probes on rank 0 and broadcasts its plan; the ranks
must agree on *whether* to probe (:func:`any_rank`). A process started by ``ddp_spawn`` has no
logging configured, so what rank 0 logs there is written where the launching process logged
(:func:`log_targets`, recorded when the strategy is pickled; :func:`log_to`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["rank", "any_rank", "on_rank_zero", "log_targets", "log_to"]


def rank() -> int:
    """This process's rank in the default process group (0 outside one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def log_targets(logger: logging.Logger) -> list[tuple[str, str, str | None, str | None]]:
    """Where ``logger``'s INFO records go: ``(kind, file or stream, format, date format)`` per
    handler (files, stdout, stderr), to reopen in a spawned process. None when ``logger`` drops
    INFO records."""
    targets: list[tuple[str, str, str | None, str | None]] = []
    if not logger.isEnabledFor(logging.INFO):
        return targets
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if handler.level > logging.INFO:
                continue
            formatter = handler.formatter
            fmt = getattr(formatter, "_fmt", None)
            datefmt = getattr(formatter, "datefmt", None)
            if isinstance(handler, logging.FileHandler):
                targets.append(("file", handler.baseFilename, fmt, datefmt))
            elif isinstance(handler, logging.StreamHandler):
                stream = getattr(handler, "stream", None)
                if stream is sys.stdout or getattr(stream, "fileno", None) and _fd(stream) == 1:
                    targets.append(("stdout", "", fmt, datefmt))
                elif stream is sys.stderr or _fd(stream) == 2:
                    targets.append(("stderr", "", fmt, datefmt))
        current = current.parent if current.propagate else None
    return targets


def _fd(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the ranks of a process group (just ``flag`` outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def log_to(logger: logging.Logger, targets: list[tuple[str, str, str | None, str | None]], text: str) -> None:
    """Log ``text`` at INFO through ``logger``, or, where it has no handler (a spawned process),
    straight to ``targets`` (:func:`log_targets` of the launching process)."""
    if logger.hasHandlers() or not targets:
        logger.info("%s", text)
        return
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "%s", (text,), None)
    for kind, where, fmt, datefmt in targets:
        handler: logging.Handler
        if kind == "file":
            handler = logging.FileHandler(where, mode="a", delay=True)
        else:
            handler = logging.StreamHandler(sys.stdout if kind == "stdout" else sys.stderr)
        handler.setFormatter(logging.Formatter(fmt, datefmt))
        try:
            handler.handle(record)
        finally:
            handler.close()


def on_rank_zero(compute: Callable[[], Any], what: str) -> Any:
    """``compute()`` on rank 0 of a process group, its (picklable) result given to every rank; just
    ``compute()`` outside one. An error on rank 0 is raised on every rank: no rank waits forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [compute()]
        except Exception as exc:
            dist.broadcast_object_list([_Failed(f"{type(exc).__name__}: {exc}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], _Failed):
        raise RuntimeError(f"{what} failed on rank 0 ({box[0].message})")
    return box[0]


class _Failed:
    """Rank 0's error, as broadcast to the other ranks."""

    def __init__(self, message: str) -> None:
        self.message = message
