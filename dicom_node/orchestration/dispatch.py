"""Dispatch of a job's derived objects: what goes where, per-destination retries, send records.

The worker writes a job's derived files and a ``manifest.json`` under
``storage.root/derived/<job id>/`` before anything is sent, so a retry never recomputes. Each
destination of ``routing.send_to`` gets a :class:`~dicom_node.models.Send` row with its own
attempts and exponential backoff (``jobs.retry_backoff_seconds`` doubling up to
``jobs.max_backoff_seconds``, at most ``jobs.send_max_attempts`` attempts). Every instance a
destination acknowledges is recorded (:class:`~dicom_node.models.SentInstance`) and never sent to
it again; a send with any instance not acknowledged is a failed attempt. A destination receives
only the kinds in ``destinations.<name>.send`` (``fused``, ``registered_mr``, ``reg``).

Send rows are claimed like jobs (``UPDATE ... WHERE state IN ('pending','retry')`` with a
rowcount check), so the scheduler and idle workers can all run :func:`retry_due_sends`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ALL_KINDS, NodeConfig
from dicom_node.errors import NetworkError, SendError
from dicom_node.models import Job, Send, SentInstance, utcnow
from dicom_node.net import scu
from dicom_node.orchestration.jobs import (
    SEND_DONE,
    SEND_FAILED,
    SEND_PENDING,
    SEND_RETRY,
    SEND_SENDING,
    SENDING,
    Settings,
    backoff_seconds,
    finish_if_sent,
    settings,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class DerivedFile:
    """One derived instance on disk."""

    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


def job_dir(config: NodeConfig, job_id: int) -> Path:
    """Folder of a job's derived files: ``storage.root/derived/<job id>``."""
    return config.storage.root / "derived" / str(int(job_id))


def write_manifest(folder: Path, files: list[DerivedFile], info: dict[str, Any]) -> Path:
    """Atomically write the manifest that marks a job's derived files complete."""
    data = {
        **info,
        "files": [
            {
                "kind": f.kind,
                "sop_instance_uid": f.sop_instance_uid,
                "series_instance_uid": f.series_instance_uid,
                "path": f.path.relative_to(folder).as_posix(),
            }
            for f in files
        ],
    }
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read_manifest(folder: Path) -> list[DerivedFile] | None:
    """The derived files listed by a complete manifest, or None when there is none (or a file
    it lists is missing)."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = []
    for item in data.get("files", []):
        f = DerivedFile(
            kind=str(item["kind"]),
            sop_instance_uid=str(item["sop_instance_uid"]),
            series_instance_uid=str(item["series_instance_uid"]),
            path=folder / str(item["path"]),
        )
        if not f.path.is_file():
            return None
        files.append(f)
    return files


def manifest_info(folder: Path) -> dict[str, Any]:
    """The manifest's extra information (stage seconds, warnings, quality), {} if none."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k != "files"}


# --------------------------------------------------------------------------- heartbeat
@contextmanager
def heartbeat_thread(beat: Callable[[], bool], interval: float) -> Iterator[threading.Event]:
    """Call ``beat()`` every ``interval`` s in a daemon thread; the yielded event is set when
    a beat returns False (the lease was lost)."""
    stop = threading.Event()
    lost = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            try:
                if not beat():
                    lost.set()
            except Exception:  # a failed beat (database busy) is retried at the next tick
                log.exception("heartbeat failed")

    thread = threading.Thread(target=run, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- send rows
def prepare_sends(
    sessions: sessionmaker[Session], config: NodeConfig, job_id: int, files: list[DerivedFile]
) -> list[int]:
    """Create the job's Send rows for every destination in ``routing.send_to`` (idempotent).

    Returns the ids of the sends not yet done.
    """
    now = utcnow()
    with sessions() as session:
        existing = {
            s.destination: s
            for s in session.scalars(select(Send).where(Send.job_id == job_id)).all()
        }
        for name in config.routing.send_to:
            dest = config.destinations.get(name)
            if dest is None or name in existing:
                continue
            kinds = [k for k in ALL_KINDS if k in dest.send]
            total = sum(1 for f in files if f.kind in kinds)
            send = Send(
                job_id=job_id,
                destination=name,
                kinds=",".join(kinds),
                state=SEND_PENDING if total else SEND_DONE,
                attempts=0,
                total=total,
                acked=0,
                updated_at=now,
                finished_at=None if total else now,
            )
            session.add(send)
        session.commit()
        return [
            int(i)
            for i in session.scalars(
                select(Send.id).where(Send.job_id == job_id, Send.state != SEND_DONE)
            ).all()
        ]


def _claim_send(
    sessions: sessionmaker[Session], send_id: int, owner: str, *, due_only: bool
) -> bool:
    now = utcnow()
    cond = [Send.id == send_id, Send.state.in_((SEND_PENDING, SEND_RETRY))]
    if due_only:
        cond.append(or_(Send.next_attempt_at.is_(None), Send.next_attempt_at <= now))
    with sessions() as session:
        result = session.execute(
            update(Send)
            .where(*cond)
            .values(state=SEND_SENDING, worker_id=owner, heartbeat_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return int(getattr(result, "rowcount", 0) or 0) == 1


def _send_heartbeat(sessions: sessionmaker[Session], send_id: int, owner: str) -> bool:
    with sessions() as session:
        result = session.execute(
            update(Send)
            .where(Send.id == send_id, Send.worker_id == owner, Send.state == SEND_SENDING)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return int(getattr(result, "rowcount", 0) or 0) == 1


def _record_acks(sessions: sessionmaker[Session], send_id: int, uids: list[str]) -> None:
    if not uids:
        return
    now = utcnow()
    with sessions() as session:
        known = set(
            session.scalars(
                select(SentInstance.sop_instance_uid).where(SentInstance.send_id == send_id)
            ).all()
        )
        for uid in dict.fromkeys(uids):
            if uid not in known:
                session.add(SentInstance(send_id=send_id, sop_instance_uid=uid, acked_at=now))
        session.commit()


def acked_uids(session: Session, send_id: int) -> set[str]:
    """SOPInstanceUIDs a send's destination has acknowledged."""
    return set(
        session.scalars(
            select(SentInstance.sop_instance_uid).where(SentInstance.send_id == send_id)
        ).all()
    )


def send_once(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    send_id: int,
    owner: str,
    files: list[DerivedFile],
    *,
    due_only: bool = False,
) -> str | None:
    """One attempt of one destination: send what it has not acknowledged, record the outcome.

    Returns the send's new state, or None when it could not be claimed (someone else has it,
    or it is not due).
    """
    if not _claim_send(sessions, send_id, owner, due_only=due_only):
        return None
    cfg = settings(config)
    with sessions() as session:
        send = session.get(Send, send_id)
        if send is None:
            return None
        name, kinds, attempts = send.destination, send.kinds.split(","), send.attempts + 1
        done = acked_uids(session, send_id)
    todo = [f for f in files if f.kind in kinds and f.sop_instance_uid not in done]
    error: str | None = None
    dest = config.destinations.get(name)
    permanent = False
    if dest is None:
        error, permanent = f"destination {name!r} is no longer configured", True
    with heartbeat_thread(lambda: _send_heartbeat(sessions, send_id, owner), cfg.heartbeat_seconds):
        # one call per series (kind), so acknowledgements are recorded series by series
        for kind in ALL_KINDS:
            if error is not None or dest is None:
                break
            batch = [f for f in todo if f.kind == kind]
            if not batch:
                continue
            try:
                result = scu.send_files(
                    dest,
                    [f.path for f in batch],
                    calling_aet=config.node.ae_title,
                    retries=0,
                    backoff_seconds=0.0,
                )
                _record_acks(sessions, send_id, list(result.sop_instance_uids))
            except SendError as exc:
                ok = [
                    f.sop_instance_uid
                    for f in batch
                    if f.sop_instance_uid not in exc.failed and str(f.path) not in exc.failed
                ]
                if exc.sent and ok:
                    _record_acks(sessions, send_id, ok)
                error = f"{kind}: {exc}"
            except NetworkError as exc:
                error = f"{kind}: {exc}"
            except Exception as exc:  # a broken send must not kill the caller's loop
                log.exception("send %d to %s crashed", send_id, name)
                error = f"{kind}: {type(exc).__name__}: {exc}"
    return _finish_attempt(sessions, send_id, owner, attempts, error, permanent, cfg)


def _finish_attempt(
    sessions: sessionmaker[Session],
    send_id: int,
    owner: str,
    attempts: int,
    error: str | None,
    permanent: bool,
    cfg: Settings,
) -> str:
    now = utcnow()
    with sessions() as session:
        send = session.get(Send, send_id)
        if send is None:
            return SEND_FAILED
        acked = len(acked_uids(session, send_id))
        values: dict[str, Any] = {
            "attempts": attempts,
            "acked": acked,
            "worker_id": None,
            "heartbeat_at": None,
            "updated_at": now,
        }
        if error is None:
            values.update(state=SEND_DONE, finished_at=now, last_error=None, next_attempt_at=None)
        elif permanent or attempts >= cfg.send_max_attempts:
            values.update(state=SEND_FAILED, finished_at=now, last_error=error[:4000])
        else:
            delay = backoff_seconds(attempts, cfg.retry_backoff_seconds, cfg.max_backoff_seconds)
            values.update(
                state=SEND_RETRY,
                last_error=error[:4000],
                next_attempt_at=now + timedelta(seconds=delay),
            )
        session.execute(
            update(Send)
            .where(Send.id == send_id, Send.worker_id == owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        state = str(values.get("state", SEND_SENDING))
    if error is None:
        log.info(
            "send %d (job %d) to %s done: %d instances acknowledged",
            send_id,
            send.job_id,
            send.destination,
            acked,
        )
    else:
        log.warning(
            "send %d (job %d) to %s attempt %d: %s -> %s",
            send_id,
            send.job_id,
            send.destination,
            attempts,
            error,
            state,
        )
    return state


def send_job(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    job_id: int,
    owner: str,
    files: list[DerivedFile],
) -> dict[str, str]:
    """First send round of a job (from the worker): every destination once. Name -> state."""
    out: dict[str, str] = {}
    for send_id in prepare_sends(sessions, config, job_id, files):
        state = send_once(sessions, config, send_id, owner, files)
        with sessions() as session:
            send = session.get(Send, send_id)
            if send is not None:
                out[send.destination] = state or send.state
    return out


def retry_due_sends(sessions: sessionmaker[Session], config: NodeConfig, owner: str) -> int:
    """Send every due retry of jobs that wait in ``sending``; close jobs whose sends ended.

    Returns the number of send attempts made. Safe to call from several processes.
    """
    now = utcnow()
    with sessions() as session:
        rows = session.execute(
            select(Send.id, Send.job_id)
            .join(Job, Job.id == Send.job_id)
            .where(
                Job.state == SENDING,
                Job.worker_id.is_(None),
                Send.state.in_((SEND_PENDING, SEND_RETRY)),
                or_(Send.next_attempt_at.is_(None), Send.next_attempt_at <= now),
            )
            .order_by(Send.next_attempt_at, Send.id)
        ).all()
        waiting_jobs = session.scalars(
            select(Job.id).where(Job.state == SENDING, Job.worker_id.is_(None))
        ).all()
    made = 0
    for send_id, job_id in rows:
        files = read_manifest(job_dir(config, int(job_id)))
        if files is None:
            _fail_send(sessions, int(send_id), "derived files are missing (retention?)")
            continue
        if send_once(sessions, config, int(send_id), owner, files, due_only=True) is not None:
            made += 1
    for job_id in set(waiting_jobs) | {int(r[1]) for r in rows}:
        finish_if_sent(sessions, int(job_id))
    return made


def _fail_send(sessions: sessionmaker[Session], send_id: int, error: str) -> None:
    now = utcnow()
    with sessions() as session:
        session.execute(
            update(Send)
            .where(Send.id == send_id, Send.state.in_((SEND_PENDING, SEND_RETRY)))
            .values(state=SEND_FAILED, last_error=error, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
