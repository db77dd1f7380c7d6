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
  (or that another fit has claimed), unless it resumes a checkpoint of that very directory. The
  command line claims it from :class:`ClaimRunDir`, a Hydra callback that runs before Hydra writes
  ``.hydra/`` or ``cli.log``, so a refused ``fit`` leaves the directory byte for byte as it was.
- :func:`remove_stale_temp_files` removes the ``.<name>.<pid>.tmp`` files that a process killed
  mid-save left behind (a resume or a new fit in that directory calls it).
- :func:`migrate_checkpoint` brings a checkpoint written by an older nde_zoo up to this one (each
  checkpoint records the version that wrote it) and warns about one written by a newer nde_zoo.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from nde_zoo import __version__

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "ClaimRunDir",
    "VerifiedCheckpointIO",
    "checkpoint_version",
    "claim_run_dir",
    "migrate_checkpoint",
    "pickled_objects_message",
    "remove_stale_temp_files",
    "tensor_checksum",
    "verify_checksum",
    "verify_checkpoint_file",
]

#: where a checkpoint keeps its checksum: ``{"algorithm": "blake2b", "digest": hex, "tensors": n}``.
CHECKSUM_KEY = "nde_zoo_checksum"
#: the file in a run directory naming the fit that owns it.
CLAIM_FILE = ".nde_zoo_run.json"

log = logging.getLogger("nde_zoo")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or what was read is not what was written."""


# -- objects a safe load refuses -------------------------------------------------------------------
def _pickled_globals(path: Any, exc: BaseException | None = None) -> list[str]:
    """The classes and functions a ``torch.load(path, weights_only=True)`` refuses, users' own first.

    Read from the pickle's opcodes without running them (``torch.serialization``'s own reader);
    on a torch without it, the one name its error message gives.
    """
    names: list[str] = []
    reader = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if reader is not None and isinstance(path, (str, os.PathLike)):
        try:
            names = list(reader(str(path)))
        except Exception:  # noqa: BLE001  (not a zip checkpoint, unreadable: the message below still helps)
            names = []
    if not names and exc is not None:
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))[:1]
    return sorted(set(names), key=lambda n: (n.startswith(("torch.", "builtins.", "collections.")), n))


def pickled_objects_message(path: Any, where: str, exc: BaseException | None = None,
                            command_line: bool = False, model: str = "Model") -> str:
    """Why a safe load (``weights_only=True``) of ``path`` failed, naming what it holds, and the ways on.

    A model's field given as an ``nn.Module`` instance is saved in the hyperparameters as the
    object itself, which ``torch.load(weights_only=True)`` (Lightning's ``Trainer(ckpt_path=...)``,
    the command line) refuses to unpickle; a field given as a config (``_target_`` + arguments) is
    saved as the config and loads safely everywhere.
    """
    names = _pickled_globals(path, exc)
    listed = ", ".join(names) if names else "classes of its own"
    own = names[0] if names else "my_project.MyField"
    allow = f"[{', '.join(names)}]" if names else "[...]"
    message = (
        f"{where} holds pickled Python objects ({listed}) that a safe load (torch.load with "
        f"weights_only=True) refuses to unpickle. A field given to the model as an nn.Module instance is "
        f"saved as that object; given as a config it is saved as the config and every load is safe: from "
        f"Python field={{'_target_': '{own}', ...arguments}}, on the command line "
        f"'model.field={{_target_: {own}, ...}}'. "
    )
    if command_line:
        return message + (
            "The command line reads only checkpoints that load safely: load this one from Python if you "
            f"trust it (with torch.serialization.safe_globals({allow}): {model}.load_from_checkpoint(path, "
            "weights_only=True)), or train again with the field given as a config"
        )
    return message + (
        f"To read this checkpoint, only if you trust it: with torch.serialization.safe_globals({allow}): "
        f"{model}.load_from_checkpoint(path, weights_only=True) (torch.serialization.add_safe_globals("
        f"{allow}) allows them for Trainer(...).fit/test(ckpt_path=...) as well), or "
        f"{model}.load_from_checkpoint(path, weights_only=False), which unpickles whatever the file holds"
    )


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


# -- versions and migrations -------------------------------------------------------------------------
#: the version a checkpoint without a ``version`` in its ``"nde_zoo"`` entry was written by.
UNVERSIONED = "0.1.0"


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"1.2.3rc1"`` -> ``(1, 2, 3)``: the release numbers (pre-release tags ignored)."""
    out = []
    for part in str(version).split("."):
        digits = re.match(r"[0-9]*", part)[0]
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def checkpoint_version(checkpoint: Any) -> str | None:
    """The nde_zoo version that wrote ``checkpoint`` (``checkpoint["nde_zoo"]["version"]``), or None.

    None for a checkpoint written before checkpoints recorded it (nde_zoo 0.1.0) or by
    something other than an nde_zoo model.
    """
    identity = checkpoint.get("nde_zoo") if isinstance(checkpoint, Mapping) else None
    version = identity.get("version") if isinstance(identity, Mapping) else None
    return str(version) if version is not None else None


def _from_unversioned(checkpoint: dict[str, Any]) -> None:
    """nde_zoo 0.1.0 wrote no version: record it. Nothing else changed, so the rest loads as it is."""
    checkpoint["nde_zoo"]["version"] = UNVERSIONED


#: ``(from version, to version, step)`` in order; ``None`` is a checkpoint without a version.
#: A release that changes what a checkpoint holds appends its step here, with a test that loads a
#: checkpoint of the version before it.
MIGRATIONS: list[tuple[str | None, str, Callable[[dict[str, Any]], None]]] = [
    (None, UNVERSIONED, _from_unversioned),
]

_warned: set[str] = set()


def _warn_once(message: str, key: str, log_only: bool = False) -> None:
    """A ``UserWarning`` (``log_only``: a warning on the ``nde_zoo`` logger instead), once per ``key``."""
    if key in _warned:
        return
    _warned.add(key)
    if log_only:
        log.warning("%s", message)
    else:
        warnings.warn(message, UserWarning, stacklevel=3)


def migrate_checkpoint(checkpoint: Any, where: str = "this checkpoint", log_only: bool = False) -> list[str]:
    """Bring ``checkpoint`` (in place) from the nde_zoo version that wrote it to this one.

    Returns the steps applied (``["unversioned -> 0.1.0"]``), also listed under
    ``checkpoint["nde_zoo"]["migrations"]``. A checkpoint written by a newer nde_zoo is left as it is,
    with a warning naming both versions (it may hold state this version does not know). A
    checkpoint that is not an nde_zoo model's (no ``"nde_zoo"`` entry) is left alone. ``log_only``:
    the warning goes to the ``nde_zoo`` logger only (the command line, whose log is ``cli.log``).
    """
    identity = checkpoint.get("nde_zoo") if isinstance(checkpoint, dict) else None
    if not isinstance(identity, dict):
        return []
    version = checkpoint_version(checkpoint)
    if version is not None and _version_tuple(version) > _version_tuple(__version__):
        _warn_once(
            f"{where} was written by nde_zoo {version}, which is newer than this nde_zoo {__version__}; it "
            f"is loaded as {__version__} understands it, and what {version} added to it (state, settings) "
            f"may be ignored or misread. Upgrade nde_zoo to {version} or later to load it fully",
            key=f"newer:{version}",
            log_only=log_only,
        )
        return []
    applied = []
    for source, target, step in MIGRATIONS:
        if checkpoint_version(checkpoint) == source:
            step(checkpoint)
            identity["version"] = target
            applied.append(f"{source or 'unversioned'} -> {target}")
    if applied:
        identity["migrations"] = [*identity.get("migrations", []), *applied]
    return applied


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
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as exc:  # a pickled field, say: name it and the ways on
            raise pickle.UnpicklingError(pickled_objects_message(path, f"checkpoint {path}", exc)) from exc
        verify_checksum(checkpoint, f"checkpoint {path}")
        migrate_checkpoint(checkpoint, f"checkpoint {path}")
        return checkpoint


def _temp_path(path: Path) -> Path:
    """Where ``path`` is written before the rename: ``.<name>.<pid>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


#: a ``_temp_path`` file: ``.<name>.<pid>.tmp``.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")


def _open_for_write(tmp: Path) -> Any:
    return open(tmp, "wb")  # noqa: SIM115  (closed by the caller's ``with``)


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with _open_for_write(tmp) as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        free = _free_bytes(path.parent)  # before the partial file goes: what the write ran into
        tmp.unlink(missing_ok=True)
        full = _out_of_space(exc, free, checkpoint)
        if full is not None:
            raise CheckpointError(
                f"{full} while writing {path} ({free} bytes free). The checkpoint needs about "
                f"{_payload_bytes(checkpoint)} bytes; nothing was written and the previous {path.name}, if "
                f"any, is unchanged. Training stops here, at the first save that failed: free disk space "
                f"(or start the run on a disk with room with hydra.run.dir=) and resume from the last good "
                f"checkpoint with ckpt_path=<run dir>/checkpoints/last.ckpt"
            ) from exc
        raise
    try:  # the rename itself survives a crash only once the directory entry is on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover  (directories cannot be fsynced on some filesystems)
        pass


#: errors of a full filesystem, as the message names them.
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _free_bytes(folder: Path) -> int:
    """Bytes this process may still write on ``folder``'s filesystem (-1 if it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def _payload_bytes(obj: Any) -> int:
    """The bytes of every tensor and array in ``obj``: about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, Mapping):
        return sum(_payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj)
    return 0


def _out_of_space(exc: BaseException, free: int, checkpoint: Any) -> str | None:
    """``"no space left on device"`` (or a quota's) when ``exc`` is a full filesystem, else None.

    ``torch.save`` reports a full disk as ``[enforce fail at inline_container.cc] unexpected pos``
    with the ``OSError`` (ENOSPC) only as its context; either is recognised, and so is that
    enforce failure with less room left than the checkpoint needs.
    """
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return _NO_SPACE[err.errno]
        err = err.__cause__ or err.__context__
    torch_writer = isinstance(exc, RuntimeError) and "unexpected pos" in str(exc)
    if torch_writer and 0 <= free < _payload_bytes(checkpoint):
        return _NO_SPACE[errno.ENOSPC]
    return None


def _process_gone(pid: int) -> bool:
    """Whether no process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary checkpoint files in ``folder`` whose writing process is gone; return them.

    A process killed while saving leaves ``.<name>.<pid>.tmp`` beside the checkpoint it was
    writing (the checkpoint itself stays whole: the rename never happened). A file is removed
    only when no process ``<pid>`` runs on this host and the run that owns ``folder`` (its
    ``.nde_zoo_run.json``, if any) ran on this host too: a pid names nothing on another machine.
    Each removal is logged on the ``nde_zoo`` logger, with the files and their size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    try:
        owner = json.loads((folder.parent / CLAIM_FILE).read_text())
    except (OSError, ValueError):
        owner = {}
    host = owner.get("host") if isinstance(owner, dict) else None
    if host not in (None, socket.gethostname()):
        return []
    removed: list[Path] = []
    size = 0
    for entry in sorted(folder.iterdir()):
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _process_gone(pid):
            continue
        try:
            size += entry.stat().st_size
            entry.unlink()
        except FileNotFoundError:  # another fit removed it first
            continue
        removed.append(entry)
    if removed:
        names = ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else "")
        log.warning(
            "removed %d temporary checkpoint file(s) from %s, left by processes that are gone (killed while "
            "saving): %s (%d bytes)", len(removed), folder, names, size,
        )
    return removed


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
        _CLAIMED.add(run_dir)
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
    _CLAIMED.add(run_dir)


#: the run directories this process has claimed (:func:`claimed_here`).
_CLAIMED: set[Path] = set()


def claimed_here(run_dir: str | os.PathLike[str]) -> bool:
    """Whether this process has claimed ``run_dir`` already (the command line claims it before Hydra runs)."""
    return Path(run_dir).resolve() in _CLAIMED


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover  (hydra-core is a dependency)
    _HydraCallback = object  # type: ignore[assignment,misc]


class ClaimRunDir(_HydraCallback):  # type: ignore[misc,valid-type]
    """A Hydra callback: a ``fit`` claims its run directory before Hydra writes into it.

    Hydra creates ``hydra.run.dir``, appends to its ``cli.log`` and writes ``.hydra/`` before the
    task starts, so a ``fit`` refused there would already have changed a directory that is not
    its own. This callback's ``on_run_start`` comes first: it resolves ``hydra.run.dir`` (and
    writes the resolved path back, so a ``${now:...}`` in it names the same directory when Hydra
    creates it) and calls :func:`claim_run_dir`, whose refusal (``SystemExit``) stops the run
    before Hydra touches the directory. The command line adds it to every ``fit``
    (``++hydra.callbacks.claim_run_dir._target_=nde_zoo.checkpoints.ClaimRunDir``). Multiruns
    (``-m``) claim each job's directory in the task, as before: their directories are new.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, read_write

        if OmegaConf.select(config, "subcommand", default=None) != "fit":
            return
        hydra_config = HydraConfig.instance()
        before = hydra_config.cfg
        hydra_config.set_config(config)  # ``${hydra:runtime.choices.model}`` in the directory's name
        try:
            run_dir = str(OmegaConf.select(config, "hydra.run.dir"))
        finally:
            hydra_config.cfg = before
        with read_write(config.hydra.run):
            config.hydra.run.dir = run_dir
        ckpt_path = OmegaConf.select(config, "ckpt_path", default=None, throw_on_missing=False)
        given = ckpt_path not in (None, "", "???")
        ckpt = str(Path(str(ckpt_path)).expanduser().absolute()) if given else None
        claim_run_dir(Path(run_dir).absolute(), ckpt)


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
    return _process_gone(pid)
