"""The embedded worker dies with ``dicom-node serve``, however serve dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.orchestration.parent import (
    EXIT_CODE_ORPHANED,
    parent_alive,
    set_parent_death_signal,
)
from tests.peers import wait_until
from tests.peers.node import NodeProcess as Node

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


def children(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_worker_exits_when_serve_is_killed(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    wait_until(lambda: " started (device " in node.log(), timeout=120, what="worker started")
    match = re.search(r"embedded worker started \(pid (\d+)\)", node.log())
    assert match
    worker = int(match.group(1))
    descendants = children(node.proc.pid)
    assert worker in descendants
    os.kill(node.proc.pid, signal.SIGKILL)  # the serve process only, as the OOM killer would
    node.proc.wait(10)
    wait_until(
        lambda: not any(alive(p) for p in descendants),
        timeout=20,
        what=f"worker {worker} and every other child of serve to exit",
    )
    assert "is gone" in node.log() or "SIGTERM received" in node.log()


def test_death_signal_and_orphan_check() -> None:
    assert set_parent_death_signal() is True
    assert parent_alive(os.getppid())
    assert not parent_alive(1 if os.getppid() != 1 else 2)
    code = "from dicom_node.orchestration.parent import die_with_parent; die_with_parent(1)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == EXIT_CODE_ORPHANED
