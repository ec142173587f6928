"""Fixtures for orchestration tests: an indexed store, patient copies, a node started as
``dicom-node serve`` with a real Orthanc as destination."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig, read_config_file
from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.storage.store import Store
from tests.peers import FIXTURES, dcmtk, free_port, port_open, wait_until

SMALL = FIXTURES / "mridir_small"
CT_DIR = SMALL / "ct"
MR_DIR = SMALL / "mr"

_UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def require_small_fixtures() -> None:
    """Skip when the committed small fixtures are missing."""
    if not (any(CT_DIR.glob("*.dcm")) and any(MR_DIR.glob("*.dcm"))):
        pytest.skip(f"small fixtures missing in {SMALL} (tests/fixtures/make_fixtures.py)")


def remap_uid(uid: str, salt: str) -> str:
    """Deterministic 2.25 UID for ``uid`` under ``salt``."""
    digest = hashlib.sha256(f"{salt}:{uid}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def rewrite_dataset(
    ds: pydicom.Dataset,
    *,
    salt: str,
    patient_id: str | None = None,
    series_description: str | None = None,
    days_shift: int | None = None,
) -> pydicom.Dataset:
    """Make ``ds`` another patient's / another series' instance (new UIDs, deterministic)."""
    for kw in _UID_TAGS:
        if kw in ds:
            setattr(ds, kw, remap_uid(str(getattr(ds, kw)), salt))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if patient_id is not None:
        ds.PatientID = patient_id
        ds.PatientName = f"TEST^{patient_id}"
    if series_description is not None:
        ds.SeriesDescription = series_description
    if days_shift:
        from datetime import datetime, timedelta

        for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            if kw in ds and str(getattr(ds, kw)):
                day = datetime.strptime(str(getattr(ds, kw))[:8], "%Y%m%d")
                setattr(ds, kw, (day + timedelta(days=days_shift)).strftime("%Y%m%d"))
    return ds


def copy_series(src: Path, dst: Path, **rewrite: Any) -> Path:
    """Copy every file of ``src`` to ``dst``, rewritten with :func:`rewrite_dataset`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        rewrite_dataset(ds, **rewrite)
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def encoded_files(folder: Path) -> list[bytes]:
    """Part-10 bytes of every file of a folder."""
    return [f.read_bytes() for f in sorted(folder.glob("*.dcm"))]


def encode(ds: pydicom.Dataset) -> bytes:
    """Part-10 bytes of a dataset."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class IndexedNode:
    """A config, database and store in a temporary folder (no network)."""

    config: NodeConfig
    engine: Engine
    sessions: sessionmaker[Session]
    store: Store

    def ingest(self, folder: Path, aet: str = "MODALITY") -> int:
        """Store every file of ``folder`` as if received from ``aet``; returns the count."""
        n = 0
        for data in encoded_files(folder):
            self.store.store_encoded(data, calling_aet=aet, peer="127.0.0.1")
            n += 1
        return n


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write a YAML config file."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def base_config(root: Path, **sections: Any) -> dict[str, Any]:
    """A test config dict with short quiet periods (sections override)."""
    cfg: dict[str, Any] = {
        "node": {"ae_title": "FUSIONNODE", "host": "127.0.0.1", "port": free_port()},
        "storage": {"root": str(root / "store"), "min_free_mb": 1},
        "pairing": {"series_quiet_seconds": 1.0, "min_slices": 20, "max_days_between": 90},
        "jobs": {"max_attempts": 3, "retry_backoff_seconds": 0.5},
        "worker": {"device": "cpu", "threads": 1, "poll_seconds": 0.2},
        "logging": {"level": "INFO"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture
def indexed_node(tmp_path: Path) -> Iterator[IndexedNode]:
    """An :class:`IndexedNode` with the default test config."""
    path = write_config(tmp_path / "node.yaml", base_config(tmp_path))
    config = read_config_file(path)
    engine = make_engine(config.database_url)
    migrate(engine)
    sessions = session_factory(engine)
    store = Store(config.storage.root, sessions, config.storage.min_free_mb)
    yield IndexedNode(config, engine, sessions, store)
    engine.dispose()


# --------------------------------------------------------------------------- running node
@dataclass
class NodeProcess:
    """``dicom-node serve`` (or ``worker``) started as a subprocess."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the process's log."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def start_node(
    args: list[str], config_path: Path, log_path: Path, env: dict[str, str] | None = None
) -> NodeProcess:
    """Start ``dicom-node ARGS --config CONFIG`` in its own process group."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", *args, "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    return NodeProcess(proc, log_path)


@pytest.fixture
def node_factory() -> Iterator[Callable[..., NodeProcess]]:
    """Start node processes; every one still running is killed at teardown."""
    started: list[NodeProcess] = []

    def make(
        args: list[str],
        config_path: Path,
        log_path: Path,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        node = start_node(args, config_path, log_path, env)
        started.append(node)
        if port is not None:
            wait_until(
                lambda: port_open(port) or node.proc.poll() is not None,
                timeout=60,
                what="node port",
            )
            if node.proc.poll() is not None:
                raise RuntimeError(f"node exited with {node.proc.returncode}:\n{node.log_tail()}")
        return node

    yield make
    for node in started:
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(10)


def storescu(
    port: int,
    folder: Path,
    *,
    calling_aet: str,
    called_aet: str = "FUSIONNODE",
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Send a folder with DCMTK storescu (full path); raises on a non-zero exit."""
    cmd = [
        dcmtk("storescu"),
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        "+sd",
        "+r",
        "127.0.0.1",
        str(port),
        str(folder),
    ]
    result = subprocess.run(
        cmd, capture_output=True, timeout=timeout, env={**os.environ, "TCP_NODELAY": "1"}
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]!r}")
    return result
