"""A send's life: one row per job and destination, claimed like a job, with its own retries.

``pending -> sending -> done``, or ``sending -> retry -> sending ...`` with backoff until
``jobs.send_max_attempts``, then ``failed``. Claims are ``UPDATE ... WHERE state IN
('pending','retry')`` with a rowcount check, so the scheduler and idle workers can all run send
retries; on PostgreSQL the row is first locked with ``FOR UPDATE SKIP LOCKED``, so a process
finding it locked by another claimer moves on instead of waiting. Every instance a destination
acknowledged is recorded (:class:`SentInstance`) and never sent to it again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.models import Job, Send, SentInstance, utcnow
from dicom_node.orchestration.jobs.lifecycle import MAX_ERROR_CHARS, rowcount, uses_row_locks
from dicom_node.orchestration.jobs.settings import Settings
from dicom_node.states import ALL_DERIVED_KINDS, DerivedKind, JobState, SendState

log = logging.getLogger(__name__)

RETRYABLE_SEND_STATES = (SendState.PENDING, SendState.RETRY)


def prepare_sends(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    job_id: int,
    kind_counts: dict[DerivedKind, int],
) -> list[int]:
    """Create the job's send rows for every destination in ``routing.send_to`` (idempotent).

    ``kind_counts``: how many derived instances of each kind the job has. A destination that
    receives none of them is done at once. Returns the ids of the sends not yet done.
    """
    now = utcnow()
    with sessions() as session:
        existing = set(session.scalars(select(Send.destination).where(Send.job_id == job_id)))
        for name in config.routing.send_to:
            dest = config.destinations.get(name)
            if dest is None or name in existing:
                continue
            kinds = [k for k in ALL_DERIVED_KINDS if k in dest.send]
            total = sum(kind_counts.get(k, 0) for k in kinds)
            session.add(
                Send(
                    job_id=job_id,
                    destination=name,
                    kinds=",".join(kinds),
                    state=SendState.PENDING if total else SendState.DONE,
                    attempts=0,
                    total=total,
                    acked=0,
                    updated_at=now,
                    finished_at=None if total else now,
                )
            )
        session.commit()
        return [
            int(i)
            for i in session.scalars(
                select(Send.id).where(Send.job_id == job_id, Send.state != SendState.DONE)
            ).all()
        ]


def claim_send(
    sessions: sessionmaker[Session], send_id: int, owner: str, *, due_only: bool
) -> bool:
    """Take a pending or retrying send for ``owner``; False when someone else has it."""
    now = utcnow()
    cond = [Send.id == send_id, Send.state.in_(RETRYABLE_SEND_STATES)]
    if due_only:
        cond.append(or_(Send.next_attempt_at.is_(None), Send.next_attempt_at <= now))
    with sessions() as session:
        if uses_row_locks(session):
            locked = select(Send.id).where(*cond).with_for_update(skip_locked=True)
            if session.scalar(locked) is None:
                session.rollback()
                return False
        result = session.execute(
            update(Send)
            .where(*cond)
            .values(state=SendState.SENDING, worker_id=owner, heartbeat_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return rowcount(result) == 1


def send_heartbeat(sessions: sessionmaker[Session], send_id: int, owner: str) -> bool:
    """Refresh the lease of a send in progress; False when ``owner`` no longer holds it."""
    with sessions() as session:
        result = session.execute(
            update(Send)
            .where(Send.id == send_id, Send.worker_id == owner, Send.state == SendState.SENDING)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return rowcount(result) == 1


def record_acks(sessions: sessionmaker[Session], send_id: int, uids: Sequence[str]) -> None:
    """Remember the instances the destination acknowledged (each once)."""
    if not uids:
        return
    now = utcnow()
    with sessions() as session:
        known = acked_uids(session, send_id)
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


def finish_send_attempt(
    sessions: sessionmaker[Session],
    send_id: int,
    owner: str,
    attempts: int,
    error: str | None,
    *,
    retryable: bool,
    cfg: Settings,
) -> SendState:
    """Record the outcome of one attempt: done, retry later with backoff, or failed."""
    now = utcnow()
    with sessions() as session:
        send = session.get(Send, send_id)
        if send is None:
            return SendState.FAILED
        acked = len(acked_uids(session, send_id))
        values: dict[str, Any] = {"attempts": attempts, "acked": acked, "updated_at": now}
        values.update(worker_id=None, heartbeat_at=None)
        if error is None:
            values.update(
                state=SendState.DONE, finished_at=now, last_error=None, next_attempt_at=None
            )
        elif not retryable or attempts >= cfg.send_max_attempts:
            values.update(
                state=SendState.FAILED, finished_at=now, last_error=error[:MAX_ERROR_CHARS]
            )
        else:
            values.update(
                state=SendState.RETRY,
                last_error=error[:MAX_ERROR_CHARS],
                next_attempt_at=now + timedelta(seconds=cfg.backoff(attempts)),
            )
        session.execute(
            update(Send)
            .where(Send.id == send_id, Send.worker_id == owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    state = SendState(values["state"])
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


def fail_send(sessions: sessionmaker[Session], send_id: int, error: str) -> None:
    """End a send that cannot be attempted at all (its derived files are gone)."""
    now = utcnow()
    with sessions() as session:
        session.execute(
            update(Send)
            .where(Send.id == send_id, Send.state.in_(RETRYABLE_SEND_STATES))
            .values(state=SendState.FAILED, last_error=error, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()


def due_sends(sessions: sessionmaker[Session]) -> tuple[list[tuple[int, int]], list[int]]:
    """(send id, job id) of the retries due now, and the jobs waiting for their sends."""
    now = utcnow()
    waiting = (Job.state == JobState.SENDING, Job.worker_id.is_(None))
    with sessions() as session:
        rows = session.execute(
            select(Send.id, Send.job_id)
            .join(Job, Job.id == Send.job_id)
            .where(
                *waiting,
                Send.state.in_(RETRYABLE_SEND_STATES),
                or_(Send.next_attempt_at.is_(None), Send.next_attempt_at <= now),
            )
            .order_by(Send.next_attempt_at, Send.id)
        ).all()
        waiting_jobs = session.scalars(select(Job.id).where(*waiting)).all()
    return [(int(s), int(j)) for s, j in rows], [int(j) for j in waiting_jobs]


def send_target(sessions: sessionmaker[Session], send_id: int) -> tuple[str, list[str], int]:
    """A send's destination name, its kinds and the number of this attempt."""
    with sessions() as session:
        send = session.get(Send, send_id)
        if send is None:
            raise KeyError(send_id)
        return send.destination, send.kinds.split(","), send.attempts + 1
