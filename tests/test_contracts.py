"""docs/contracts.md is generated from the code and must be current."""

from __future__ import annotations

import subprocess
import sys

from tests.peers import REPO


def test_contracts_document_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "contracts.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
