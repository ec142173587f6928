"""Durable file writes: the one place that knows how to make a file survive a power cut.

A file is written under a temporary name in its final folder, flushed and fsynced, renamed into
place and its folder fsynced, so a reader (or the next start after a crash) sees either the old
file or the complete new one, never half of it. The store, the worker's derived files, the job
manifest and ``dicom-node fuse`` all write through here.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

FILE_MODE = 0o640
"""Mode of files the node writes: they may hold patient data (owner read/write, group read)."""

DIR_MODE = 0o750
"""Mode of folders the node creates."""


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it exists; log (never raise) when it cannot be removed."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)


def is_disk_full(exc: OSError) -> bool:
    """True when ``exc`` says the disk or the quota is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def temporary_name(path: Path) -> Path:
    """A hidden, unique temporary name beside ``path`` (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def make_dirs(path: Path, *, stop_at: Path | None = None) -> None:
    """Create ``path`` and missing parents, fsyncing each parent whose entries changed.

    ``stop_at`` (an existing ancestor, e.g. the storage root) bounds the walk up.
    """
    missing: list[Path] = []
    p = path
    while not p.is_dir() and p != stop_at and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=DIR_MODE, exist_ok=True)
        fsync_dir(d.parent)


def write_durably(path: Path, write: Callable[[BinaryIO], None], *, mode: int = FILE_MODE) -> None:
    """Create ``path`` atomically with the bytes ``write(fh)`` produces (see module docstring)."""
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_durably(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Create ``path`` atomically holding ``data``."""

    def write(fh: BinaryIO) -> None:
        fh.write(data)

    write_durably(path, write, mode=mode)


def write_text_durably(path: Path, text: str, *, mode: int = FILE_MODE) -> None:
    """Create ``path`` atomically holding ``text`` (UTF-8)."""
    write_bytes_durably(path, text.encode("utf-8"), mode=mode)
