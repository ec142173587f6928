"""dicom3tools' dciodvfy: every object the node creates must pass it without errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.peers import require_binary

DCIODVFY_TIMEOUT = 120


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that start with 'Error' (it reports on stderr)."""
    exe = require_binary("dciodvfy", "dicom3tools")
    proc = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=DCIODVFY_TIMEOUT, check=False
    )
    lines = (proc.stderr + proc.stdout).splitlines()
    return [line for line in lines if line.startswith("Error")]
