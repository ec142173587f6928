"""Plain helper modules for tests that talk to real peers (never conftest imports).

This module: free ports, deadlines, data paths, skipping when a binary or data set is missing.
Beside it: ``orthanc`` (a real Orthanc), ``dcmtk_tools`` (storescu/echoscu), ``dciodvfy``,
``node`` (``dicom-node`` processes).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("MRCT_SHARED_DATA", REPO.parent / "shared" / "data"))
MRIDIR = SHARED_DATA / "mridir-phantom"
AANLIB = SHARED_DATA / "aanlib-ct-mri"
FIXTURES = REPO / "tests" / "fixtures"

# pynetdicom installs console scripts called storescu/echoscu too: always use DCMTK's by path.
DCMTK_DIR = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what or predicate}: {last_exc!r}"
    )


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def dcmtk(name: str) -> str:
    """Full path of a DCMTK program; skip the test when DCMTK is not installed."""
    path = DCMTK_DIR / name
    if not path.exists():
        pytest.skip(f"DCMTK program {path} not installed (apt-get install dcmtk)")
    return str(path)


def require_binary(name: str, package: str) -> str:
    """Path of a binary on PATH, or skip with the Debian package that provides it."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return found


def require_full_data(path: Path) -> Path:
    """Skip unless a full shared data set is present (CI has it; a bare clone may not)."""
    if not path.exists():
        pytest.skip(f"full data set {path} not present (it belongs in ../shared/data)")
    return path
