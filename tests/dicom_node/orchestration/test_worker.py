"""The worker's start-up line says how fusion will really run (device, resolved precision);
it waits for a locked database instead of exiting."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from dicom_node import db
from dicom_node.config import NodeConfig
from dicom_node.orchestration import worker
from fusion_engine import onednn
from tests.peers import wait_until
from tests.support.indexed import make_indexed_node


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "channels_last")])
def test_bf16_request_is_reported_as_it_will_run(
    native: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onednn, "bf16_supported", lambda: native)
    cfg = NodeConfig.model_validate({"worker": {"device": "cpu"}, "fusion": {"precision": "bf16"}})
    assert worker.compute_summary(cfg) == f"device cpu, precision {expected}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_is_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    cfg = NodeConfig.model_validate({"worker": {"device": "cuda"}})
    with caplog.at_level(logging.ERROR, logger="dicom_node.orchestration.worker"):
        summary = worker.compute_summary(cfg)
    assert "unusable" in summary
    assert "CUDA is not available" in caplog.text


def test_locked_database_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database locked longer than the busy timeout: the worker retries, never exits."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr(worker, "DB_RETRY_FIRST", 0.1)
    # a short lease: the worker's stale-lease recovery writes every half second
    node = make_indexed_node(tmp_path, jobs={"lease_seconds": 1.0})
    node.close()
    db_file = node.config.storage.root / "index.sqlite3"
    holder = sqlite3.connect(db_file, timeout=0.1, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.main(node.config, stop=stop)))
    with caplog.at_level(logging.WARNING, logger="dicom_node.orchestration.worker"):
        thread.start()
        try:
            wait_until(
                lambda: caplog.text.count("database unavailable") >= 3, timeout=30, what="retries"
            )
            assert thread.is_alive(), "the worker must not exit on a locked database"
            assert "database is locked" in caplog.text
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        seen = caplog.text.count("database unavailable")
        wait_until(lambda: result or thread.is_alive(), timeout=5)
        stop.set()
        thread.join(30)
    assert result == [0]
    assert caplog.text.count("database unavailable") <= seen + 1  # recovered once released
