"""``/healthz`` (the process answers) and ``/readyz`` (it can take and process data).

Readiness means: the database answers, the storage folder accepts a new file and has more
free space than ``storage.min_free_mb`` (else every C-STORE would be refused), and the fusion
worker runs. ``serve`` knows its embedded worker's process. Where the console runs without one
(``worker_alive`` is None) nothing in the database says whether an external worker lives
(a job's heartbeat exists only while it runs one), so the check answers "unknown" and does not
make the node unready; watch such workers with their own process supervisor.

Both endpoints need no login and show no patient data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.console.views import MB, disk_view
from dicom_node.storage.fsutil import temporary_name, unlink_quietly

router = APIRouter(tags=["health"])


@dataclass(frozen=True)
class Check:
    """One readiness check: passed (True), failed (False) or unknown (None), and why."""

    name: str
    ok: bool | None
    detail: str


def database_check(sessions: sessionmaker[Session]) -> Check:
    """The index answers a query."""
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return Check("database", False, f"unreachable: {type(exc).__name__}")
    return Check("database", True, "reachable")


def storage_check(config: NodeConfig) -> Check:
    """A file can be created in the storage folder, and free space is above the floor."""
    root = config.storage.root
    probe = temporary_name(root / ".readyz")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as exc:
        return Check("storage", False, f"{root} not writable: {exc.strerror or exc}")
    finally:
        unlink_quietly(probe)
    disk = disk_view(config)
    if not disk.ok:
        return Check(
            "storage",
            False,
            f"{disk.free_bytes // MB} MB free, below storage.min_free_mb "
            f"{disk.min_free_bytes // MB} MB: C-STOREs are refused",
        )
    return Check("storage", True, f"writable, {disk.free_bytes // MB} MB free")


def worker_check(worker_alive: Callable[[], bool | None]) -> Check:
    """The fusion worker runs (unknown for workers outside this process's care)."""
    alive = worker_alive()
    if alive is None:
        return Check("worker", None, "no embedded worker: external workers are not checked")
    return Check("worker", alive, "running" if alive else "not running")


def readiness(
    sessions: sessionmaker[Session], config: NodeConfig, worker_alive: Callable[[], bool | None]
) -> tuple[bool, list[Check]]:
    """Every readiness check, and whether none failed."""
    checks = [database_check(sessions), storage_check(config), worker_check(worker_alive)]
    return all(c.ok is not False for c in checks), checks


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive and answers HTTP."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a check failed"}})
def readyz(request: Request) -> JSONResponse:
    """Database reachable, storage writable (and above its floor), worker alive."""
    ctx = request.app.state.ctx
    ok, checks = readiness(ctx.sessions, ctx.config, ctx.worker_alive)
    body = {
        "status": "ready" if ok else "not ready",
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    return JSONResponse(body, status_code=200 if ok else 503)
