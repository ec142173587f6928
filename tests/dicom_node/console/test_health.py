"""/healthz and /readyz: database, storage (writable, above its floor), worker."""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.console.health import readiness, storage_check, worker_check
from tests.support.console import make_console
from tests.support.indexed import IndexedNode


def test_ready_and_alive(tmp_path: Path) -> None:
    c = make_console(tmp_path, worker_alive=True)
    try:
        assert c.client.get("/healthz").json() == {"status": "ok"}
        r = c.client.get("/readyz")
        assert r.status_code == 200
        checks = r.json()["checks"]
        assert {k: v["ok"] for k, v in checks.items()} == {
            "database": True,
            "storage": True,
            "worker": True,
        }
        assert not list(c.node.config.storage.root.glob(".readyz*"))  # the probe is removed
    finally:
        c.close()


def test_dead_worker_makes_the_node_unready(tmp_path: Path) -> None:
    c = make_console(tmp_path, worker_alive=False)
    try:
        r = c.client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["worker"]["ok"] is False
        assert c.client.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        c.close()


def test_unwritable_or_full_storage(tmp_path: Path, indexed_node: IndexedNode) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = NodeConfig.model_validate({"storage": {"root": str(blocker / "storage")}})
    check = storage_check(cfg)
    assert check.ok is False and "not writable" in check.detail
    full = indexed_node.config.model_copy(
        update={"storage": indexed_node.config.storage.model_copy(update={"min_free_mb": 10**12})}
    )
    check = storage_check(full)
    assert check.ok is False and "C-STOREs are refused" in check.detail
    ok, checks = readiness(indexed_node.sessions, full, lambda: True)
    assert not ok and [c.ok for c in checks] == [True, False, True]


def test_unreachable_database(tmp_path: Path) -> None:
    from dicom_node.db import make_engine, session_factory

    folder = tmp_path / "a-folder"
    folder.mkdir()
    engine = make_engine(f"sqlite:///{folder}")  # a folder is no database
    try:
        ok, checks = readiness(session_factory(engine), NodeConfig(), lambda: None)
    finally:
        engine.dispose()
    assert not ok and checks[0].ok is False and "unreachable" in checks[0].detail


def test_external_worker_is_unknown_not_failed() -> None:
    check = worker_check(lambda: None)
    assert check.ok is None and "external" in check.detail
