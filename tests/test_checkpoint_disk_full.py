"""A checkpoint save on a full filesystem says so: "no space left on device while writing <path> (N bytes
free)", where it used to stop with torch's ``[enforce fail at inline_container.cc:672] . unexpected pos
52224 vs 52112``. Nothing is left behind, and the previous checkpoint stays whole.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from nde_zoo import checkpoints
from nde_zoo.checkpoints import CheckpointError, VerifiedCheckpointIO, verify_checkpoint_file

BIG = {"state_dict": {"w": torch.randn(256, 256)}}  # 256 KiB of weights


def _message(path) -> re.Pattern:
    return re.compile(rf"no space left on device while writing {re.escape(str(path))} \((\d+) bytes free\)")


def test_a_full_device_is_named(tmp_path, monkeypatch):
    """Writes that fail with ENOSPC (/dev/full), as torch.save meets them on a full disk."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr(checkpoints, "_open_for_write", lambda tmp: open("/dev/full", "wb"))  # noqa: SIM115
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as info:
        VerifiedCheckpointIO().save_checkpoint(dict(BIG), target)
    text = str(info.value)
    assert _message(target).search(text), text
    assert "inline_container" not in text and "resume from the last good checkpoint" in text
    assert f"needs about {256 * 256 * 4} bytes" in text


def test_a_full_filesystem_is_named_and_the_last_checkpoint_survives(tmp_path):
    """A real 192 KiB tmpfs (needs the right to mount one: root, as in the zoo's CI containers)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        io = VerifiedCheckpointIO()
        target = mount / "checkpoints" / "last.ckpt"
        io.save_checkpoint({"state_dict": {"w": torch.ones(64, 64)}}, target)  # 16 KiB: fits
        before = target.read_bytes()
        with pytest.raises(CheckpointError) as info:
            io.save_checkpoint(dict(BIG), target)
        text = str(info.value)
        found = _message(target).search(text)
        assert found, text
        assert int(found[1]) < 256 * 256 * 4  # the room there was, less than the checkpoint needs
        assert "inline_container" not in text and "unexpected pos" not in text
        assert target.read_bytes() == before and verify_checkpoint_file(target)["state_dict"]["w"].shape == (
            64,
            64,
        )
        assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_other_write_errors_keep_their_own_message(tmp_path, monkeypatch):
    def refused(tmp):
        raise PermissionError(13, "Permission denied", str(tmp))

    monkeypatch.setattr(checkpoints, "_open_for_write", refused)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*PermissionError") as info:
        VerifiedCheckpointIO().save_checkpoint(dict(BIG), tmp_path / "last.ckpt")
    assert "no space left" not in str(info.value)
