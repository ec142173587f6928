"""A node spread over "machines": one ``serve`` without its worker and N ``dicom-node worker``
processes, each with its own config file and host name, on one database and one storage root.

Used by the scale-out test (``tests/e2e/test_scale_out.py``) and its benchmark
(``benchmarks/scale_out.py``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peers import wait_until
from tests.peers.dcmtk_tools import storescu_folder
from tests.peers.hosts import as_host
from tests.peers.node import (
    FAST_ORCHESTRATION,
    NODE_AET,
    IndexView,
    NodeProcess,
    node_config,
    start_node,
)
from tests.peers.orthanc import Orthanc
from tests.support.data import SMALL_CT, SMALL_MR, copy_series

WORKER_HOSTS = ("worker-a", "worker-b", "worker-c", "worker-d", "worker-e", "worker-f")
"""Host names of the worker "machines", in start order."""

WORKER_START_TIMEOUT = 120.0
"""Seconds a worker may take to import torch and say it started (a loaded 2-core machine)."""

CLAIM_LINE = re.compile(r"job (\d+) claimed by worker (\S+)")


def deployment_sections(
    storage: Path, database_url: str, pacs: Orthanc, **overrides: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Config sections every machine shares: database, storage, routing, fast test timings."""
    sections: dict[str, dict[str, Any]] = {
        **FAST_ORCHESTRATION,
        "storage": {"root": str(storage), "min_free_mb": 1},
        "database": {"url": database_url},
        "destinations": {
            "pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        },
        "routing": {"send_to": ["pacs"]},
    }
    for name, value in overrides.items():
        sections[name] = {**sections.get(name, {}), **value}
    return sections


@dataclass
class Deployment:
    """The running processes of one scaled-out node, and views of its index."""

    serve: NodeProcess
    workers: dict[str, NodeProcess] = field(default_factory=dict)

    @property
    def view(self) -> IndexView:
        """Read-only views of the shared index (opened on first use)."""
        if not hasattr(self, "_view"):
            self._view = IndexView(self.serve)
        return self._view

    def add_worker(self, root: Path, host: str) -> NodeProcess:
        """Start ``dicom-node worker`` as host ``host`` with its own copy of the config."""
        workdir = root / host
        workdir.mkdir()
        cfg = {k: v for k, v in self.serve.config.items() if k != "node"}
        worker = start_node(
            workdir, cfg, command="worker", wait_for_port=False, prefix=as_host(host)
        )
        self.workers[host] = worker
        return worker

    def wait_workers_started(self) -> None:
        """Wait until every worker has logged its start-up line."""
        for host, worker in self.workers.items():

            def started(w: NodeProcess = worker) -> bool:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {w.proc.returncode}:\n{w.log_tail()}")
                return "started (device" in w.log_tail()

            wait_until(started, timeout=WORKER_START_TIMEOUT, what=f"{host} to start")

    def claims(self) -> Counter[int]:
        """How many times each job was claimed, from every worker's log."""
        found: Counter[int] = Counter()
        for worker in self.workers.values():
            found.update(int(m[1]) for m in CLAIM_LINE.finditer(worker.log()))
        return found

    def logs(self) -> str:
        """The end of every process's log, for failure messages."""
        parts = [f"--- serve\n{self.serve.log_tail(3000)}"]
        parts += [f"--- {h}\n{w.log_tail(3000)}" for h, w in self.workers.items()]
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM everything still running (workers first); SIGKILL what does not stop."""
        if hasattr(self, "_view"):
            self._view.close()
        for process in [*self.workers.values(), self.serve]:
            if process.proc.poll() is None:
                with contextlib.suppress(Exception):
                    process.stop(timeout=30)


def deploy(root: Path, sections: dict[str, dict[str, Any]], workers: int) -> Deployment:
    """Start serve (``worker.embedded: false``) and ``workers`` workers under ``root``."""
    serve_dir = root / "serve"
    serve_dir.mkdir(parents=True)
    worker_section = {**sections.get("worker", {}), "embedded": False}
    merged: dict[str, Any] = {**sections, "worker": worker_section}
    cfg = node_config(serve_dir, **merged)
    deployment = Deployment(start_node(serve_dir, cfg))
    for host in WORKER_HOSTS[:workers]:
        deployment.add_worker(root, host)
    return deployment


def patient_pairs(
    root: Path, count: int, tag: str, *, ct: Path = SMALL_CT, mr: Path = SMALL_MR
) -> list[tuple[Path, Path]]:
    """``count`` CT-MR pairs of ``count`` different patients, rewritten from ``ct`` and ``mr``
    (the small fixtures by default)."""
    pairs = []
    for i in range(count):
        salt, pid = f"{tag}-{i}", f"{tag.upper()}-{i}"
        ct_copy = copy_series(ct, root / f"p{i}" / "ct", salt=salt, patient_id=pid)
        mr_copy = copy_series(mr, root / f"p{i}" / "mr", salt=salt, patient_id=pid)
        pairs.append((ct_copy, mr_copy))
    return pairs


def send_pairs(port: int, pairs: list[tuple[Path, Path]]) -> None:
    """Send every CT (from CTSIM), then every MR (from MRSCANNER), with DCMTK storescu."""
    for ct, _ in pairs:
        storescu_folder(port, ct, calling="CTSIM", called=NODE_AET)
    for _, mr in pairs:
        storescu_folder(port, mr, calling="MRSCANNER", called=NODE_AET)


def remove_tree(path: Path) -> None:
    """Delete a folder of patient-like data made by a run."""
    shutil.rmtree(path, ignore_errors=True)
