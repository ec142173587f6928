"""Reading an audit log back: its records, and whether its hash chain is intact.

Each record carries the SHA-256 of the line before it (``prev``), so an edited, removed or
inserted line breaks the chain at that point; :func:`verify_log` finds where.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def line_digest(line: bytes) -> str:
    """The ``prev`` value that the record after ``line`` carries."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclass
class Verification:
    """What :func:`verify_log` found."""

    records: int = 0
    problems: list[str] = field(default_factory=list)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit log, oldest first (unparseable lines skipped)."""
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def verify_log(path: Path) -> Verification:
    """Check the hash chain of an audit log: every line must name its predecessor's digest.

    The first line's ``prev`` is not checked (the log may have been rotated before it).
    """
    result = Verification()
    previous: bytes | None = None
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            result.problems.append(f"line {number}: not JSON (cut short or edited)")
            previous = line
            continue
        result.records += 1
        if previous is not None and entry.get("prev") != line_digest(previous):
            result.problems.append(f"line {number}: chain broken (a line before it changed)")
        previous = line
    return result
