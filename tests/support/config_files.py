"""Config files written by tests (YAML from dicts, or text as an editor would leave it)."""

from __future__ import annotations

from pathlib import Path

import yaml


def write(path: Path, data: object) -> Path:
    """Write ``data`` (a mapping as YAML, or text as is) to ``path``; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path
