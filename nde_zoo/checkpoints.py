"""Checkpoints that are verified when written and when read, and run directories that are never shared.

- :func:`tensor_checksum` hashes every tensor (and plain value) of a checkpoint; the zoo stores it
  under ``"nde_zoo_checksum"`` and :func:`verify_checksum` recomputes it on load, so a checkpoint
  whose bytes changed on disk is refused with an error naming the file instead of loading silently.
- :class:`VerifiedCheckpointIO` is a Lightning ``CheckpointIO`` plugin (the command line installs
  it; from Python pass ``lightning.Trainer(plugins=[VerifiedCheckpointIO()])``). It writes each
  checkpoint to a temporary file, fsyncs and renames it into place, reads it back and checks the
  checksum, and raises :class:`CheckpointError` at the first save that fails. Lightning 2.6's own
  writer swallows a ``PermissionError``, so an unwritable ``checkpoints/`` folder used to train to the
  end, exit 0 and leave no checkpoint. On load it verifies the checksum too.
- :func:`claim_run_dir` makes a ``fit`` refuse a run directory that holds another run's checkpoints
  (or that another fit has claimed), unless it resumes a checkpoint of that very directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "VerifiedCheckpointIO",
    "claim_run_dir",
    "tensor_checksum",
    "verify_checksum",
    "verify_checkpoint_file",
]

#: where a checkpoint keeps its checksum: ``{"algorithm": "blake2b", "digest": hex, "tensors": n}``.
CHECKSUM_KEY = "nde_zoo_checksum"
#: the file in a run directory naming the fit that owns it.
CLAIM_FILE = ".nde_zoo_run.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or what was read is not what was written."""


# -- checksums ---------------------------------------------------------------------------------
def _feed(h: Any, obj: Any, counter: list[int]) -> None:
    """Hash ``obj`` in a fixed order: tensors by dtype, shape and bytes; mappings by sorted key."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_sparse:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        counter[0] += 1
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
        counter[0] += 1
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            if key == CHECKSUM_KEY:
                continue
            h.update(repr(key).encode())
            _feed(h, obj[key], counter)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item, counter)
        h.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(repr(obj).encode())
    else:  # other objects (sets, modules, enums...): their type only, their repr may not be stable
        h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())


def tensor_checksum(checkpoint: Mapping[str, Any], scope: str = "all") -> dict[str, Any]:
    """A checksum of every tensor and plain value (numbers, strings) in ``checkpoint``.

    ``scope``: ``"all"`` (the whole checkpoint but the checksum itself) or ``"state_dict"`` (the
    weights only: what a model's ``on_save_checkpoint`` can vouch for, since hooks that run after
    it may add other keys). Returns ``{"algorithm": "blake2b", "scope": ..., "digest": <hex>,
    "tensors": <count>}``.
    """
    if scope not in ("all", "state_dict"):
        raise ValueError(f"scope must be 'all' or 'state_dict', got {scope!r}")
    h = hashlib.blake2b(digest_size=32)
    counter = [0]
    _feed(h, checkpoint if scope == "all" else checkpoint.get("state_dict", {}), counter)
    return {"algorithm": "blake2b", "scope": scope, "digest": h.hexdigest(), "tensors": counter[0]}


def add_checksum(checkpoint: dict[str, Any], scope: str = "all") -> dict[str, Any]:
    """Store :func:`tensor_checksum` in ``checkpoint`` (in place) and return it."""
    checkpoint[CHECKSUM_KEY] = tensor_checksum(checkpoint, scope)
    return checkpoint


def verify_checksum(checkpoint: Any, where: str) -> bool:
    """Raise :class:`CheckpointError` naming ``where`` if ``checkpoint``'s checksum does not match.

    Returns False for a checkpoint without a checksum (written outside the zoo), True when verified.
    """
    saved = checkpoint.get(CHECKSUM_KEY) if isinstance(checkpoint, Mapping) else None
    if not saved:
        return False
    now = tensor_checksum(checkpoint, saved.get("scope", "all"))
    if now["digest"] != saved.get("digest"):
        raise CheckpointError(
            f"{where} is corrupted: its tensors do not match the checksum written with it "
            f"({saved.get('tensors')} "
            f"tensors saved, {now['tensors']} read; blake2b {saved.get('digest', '')[:12]}... saved, "
            f"{now['digest'][:12]}... read). The file changed after it was written (disk, copy or transfer "
            f"error); use another checkpoint, e.g. the run's other one (last.ckpt or epochNNN.ckpt), "
            f"or re-copy it"
        )
    return True


def verify_checkpoint_file(path: str | os.PathLike[str], *, weights_only: bool = False) -> dict[str, Any]:
    """Load ``path`` on the CPU and verify its checksum; raises :class:`CheckpointError` naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as exc:
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CheckpointError(
            f"checkpoint {path} is not readable ({type(exc).__name__}: {first_line}); "
            f"it may be truncated or corrupted: use another one, e.g. checkpoints/last.ckpt of the same run"
        ) from exc
    verify_checksum(checkpoint, f"checkpoint {path}")
    return checkpoint


# -- the Lightning plugin ----------------------------------------------------------------------------
class VerifiedCheckpointIO(TorchCheckpointIO):
    """Write checkpoints atomically, read each one back and check it; verify checksums on load.

    Saving: the checkpoint gets a :func:`tensor_checksum`, is written with ``torch.save`` to a
    temporary file beside the target, flushed to disk (``fsync``) and renamed over the target (so
    the old file stays whole until the new one is complete), then loaded back and its checksum
    checked. Any failure raises :class:`CheckpointError` naming the file and the cause, which stops
    ``fit`` at the first failed save (Lightning calls this on global rank 0 only). Remote paths
    (``s3://`` and other fsspec URLs) are written by Lightning's own writer and then read back.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        add_checksum(checkpoint)
        fs = get_filesystem(path)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        try:
            if local:
                _write_atomically(checkpoint, Path(path))
            else:
                super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"could not write checkpoint {path}: {type(exc).__name__}: {exc}. Training stops here, "
                f"at the first save that failed, so no more work is lost: make its folder writable (or "
                f"free disk space) and resume from the last good checkpoint, or use a writable hydra.run.dir="
            ) from exc
        try:
            if local:
                back = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            else:
                back = super().load_checkpoint(path, weights_only=False)
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {path} was written but cannot be read back ({type(exc).__name__}: {exc}); the "
                f"filesystem lost or truncated it. Training stops here: check the disk, then resume from the "
                f"last good checkpoint"
            ) from exc
        if not verify_checksum(back, f"checkpoint {path}, just written,"):
            raise CheckpointError(
                f"checkpoint {path} was read back without its checksum: the write did not land"
            )

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        verify_checksum(checkpoint, f"checkpoint {path}")
        return checkpoint


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a crash only once the directory entry is on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover  (directories cannot be fsynced on some filesystems)
        pass


# -- run directories ----------------------------------------------------------------------------------
def _process_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not distributed)."""
    for key in ("RANK", "SLURM_PROCID"):  # torchrun, srun: the global rank itself
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    # Lightning's own launcher sets only the local and node ranks for the processes it starts
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    return int(local.isdigit() and int(local) > 0 or node.isdigit() and int(node) > 0)


def claim_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """Make ``run_dir`` this fit's own, or refuse it (``SystemExit`` with a message).

    Refused: a directory whose ``checkpoints/`` holds ``*.ckpt`` files, or that another fit has
    claimed, unless this fit resumes from a checkpoint inside that very ``checkpoints/`` folder
    (resuming a run in place; also a SLURM job requeued by Lightning, which resumes from the
    ``hpc_ckpt_*.ckpt`` it left in the directory). The claim is a file created atomically
    (``O_EXCL``), so two fits started into one directory at the same moment cannot both get it;
    the claim of a fit that died on this host before writing any checkpoint is taken over. Only
    global rank 0 claims: the other ranks of a distributed fit share rank 0's directory by design.
    """
    if _process_rank() != 0:
        return
    run_dir = Path(run_dir).resolve()
    ckpt_dir = run_dir / "checkpoints"
    resuming_here = (ckpt_path is not None and Path(ckpt_path).resolve().parent == ckpt_dir) or (
        ckpt_path is None and any(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's SLURM requeue resumes these
    )
    claim = run_dir / CLAIM_FILE
    record = {
        "id": uuid.uuid4().hex,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "resumed_from": ckpt_path,
    }
    if resuming_here:
        run_dir.mkdir(parents=True, exist_ok=True)
        claim.write_text(json.dumps(record))
        return
    existing = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    fix = (
        f"start it in a new directory (leave hydra.run.dir at its default, which is unique per run, or "
        f"pass another one), or resume that run with ckpt_path={ckpt_dir / 'last.ckpt'}"
    )
    if existing:
        raise SystemExit(
            f"error: the run directory {run_dir} already holds another run's checkpoints "
            f"({', '.join(existing[:4])}"
            f"{' ...' if len(existing) > 4 else ''}); this fit would overwrite them: {fix}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = json.loads(claim.read_text())
                who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
            except (OSError, ValueError):
                owner, who = {}, "unknown"
            if attempt == 0 and _dead_here(owner) and _take_over(claim, owner):
                continue
            raise SystemExit(
                f"error: the run directory {run_dir} belongs to another fit ({who}); two fits must not share "
                f"a directory (their last.ckpt and .hydra/config.yaml would overwrite each other): {fix}"
            ) from None
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)


def _take_over(claim: Path, owner: dict[str, Any]) -> bool:
    """Move a dead fit's claim aside; False (claim untouched) if another fit got there first."""
    aside = claim.with_name(f"{CLAIM_FILE}.dead-{owner.get('pid')}-{os.getpid()}")
    try:
        claim.rename(aside)  # atomic: of two fits taking over at once, one moves the dead claim
    except FileNotFoundError:
        return False
    try:
        moved = json.loads(aside.read_text())
    except (OSError, ValueError):
        moved = {}
    if moved.get("id") == owner.get("id"):
        return True
    try:  # we moved a live fit's fresh claim: put it back (link fails if yet another claim exists)
        os.link(aside, claim)
    except OSError:
        pass
    aside.unlink(missing_ok=True)
    return False


def _dead_here(owner: dict[str, Any]) -> bool:
    """Whether the claim's fit ran on this host and its process no longer exists."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False
