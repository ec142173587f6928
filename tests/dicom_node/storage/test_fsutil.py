"""Durable writes: all or nothing, owner/group-only files, no temporary files left behind."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from dicom_node.storage import fsutil


def test_write_is_complete_and_not_world_readable(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    fsutil.make_dirs(target.parent)
    fsutil.write_bytes_durably(target, b"payload")
    assert target.read_bytes() == b"payload"
    assert stat.S_IMODE(target.stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE(target.parent.stat().st_mode) & 0o007 == 0
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    fsutil.write_text_durably(target, "old")

    def broken(fh: BinaryIO) -> None:
        fh.write(b"half")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        fsutil.write_durably(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_unlink_quietly_and_disk_full(tmp_path: Path) -> None:
    fsutil.unlink_quietly(tmp_path / "missing")  # no error
    assert fsutil.is_disk_full(OSError(28, "No space left on device"))
    assert not fsutil.is_disk_full(OSError(13, "Permission denied"))
