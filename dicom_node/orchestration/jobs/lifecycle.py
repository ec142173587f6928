"""A job's life as its worker drives it: creation, atomic claim, stages, hand-over, outcome.

A job is one CT-MR pair. Its life::

    queued -> registering -> fusing -> writing -> sending -> done
       ^          |            |          |          |
       +----------+------------+----------+          +--> (sends wait in retry) --> done | failed
       (attempt failed or worker lost: back to queued with backoff, or failed after
        ``jobs.max_attempts``)

``cancelled`` is a terminal state set by an admin. Every transition made by a worker is an
``UPDATE ... WHERE id=? AND worker_id=?`` so a worker that lost its job (lease expired,
cancelled) cannot overwrite what another process decided. Claiming ends in
``UPDATE jobs SET state='registering', worker_id=? WHERE id=? AND state='queued'`` with a
rowcount check: no two workers ever take one job. How the row is chosen depends on the backend:

* PostgreSQL (several workers, often on several machines): ``SELECT ... ORDER BY id LIMIT 1
  FOR UPDATE SKIP LOCKED`` locks the oldest runnable job; a worker never waits for a row another
  worker is claiming, it takes the next one;
* SQLite (one machine): a handful of candidates, each tried with the conditional UPDATE (SQLite
  has no row locks; its database lock serialises the UPDATEs).

A claimed job carries a heartbeat (``heartbeat_at``) refreshed by its worker; a job in an
active state whose heartbeat is older than ``jobs.lease_seconds`` belongs to a dead worker
(SIGKILL, OOM, power loss) and :func:`~dicom_node.orchestration.jobs.recovery.recover_stale`
puts it back in the queue.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import Job, JobStage, utcnow
from dicom_node.orchestration.jobs.settings import Settings
from dicom_node.states import ACTIVE_JOB_STATES, OPEN_SEND_STATES, JobState, SendState

log = logging.getLogger(__name__)

CLAIM_CANDIDATES = 10
"""Queued jobs looked at per claim attempt (another worker may win the first ones)."""

MAX_ERROR_CHARS = 4000
"""Longest error text kept in a job or send row."""


def rowcount(result: Any) -> int:
    """Rows an UPDATE changed (0 when the driver does not say)."""
    if isinstance(result, CursorResult):
        return int(result.rowcount or 0)
    return int(getattr(result, "rowcount", 0) or 0)


# --------------------------------------------------------------------------- creation
def create_job(
    session: Session,
    *,
    patient_id: str,
    issuer_of_patient_id: str,
    ct_series_uid: str,
    mr_series_uid: str,
    ct_revision: int,
    mr_revision: int,
    pairing_reason: str,
) -> Job:
    """Add a queued job for a CT-MR pair (the caller commits).

    ``revision`` counts earlier jobs of the same pair, so the outputs of a reprocessed pair get
    new UIDs while retries of one job keep theirs.
    """
    earlier = session.scalars(
        select(Job.id).where(Job.ct_series_uid == ct_series_uid, Job.mr_series_uid == mr_series_uid)
    ).all()
    now = utcnow()
    job = Job(
        state=JobState.QUEUED,
        patient_id=patient_id,
        issuer_of_patient_id=issuer_of_patient_id,
        ct_series_uid=ct_series_uid,
        mr_series_uid=mr_series_uid,
        ct_revision=ct_revision,
        mr_revision=mr_revision,
        revision=len(earlier),
        pairing_reason=pairing_reason,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    return job


# --------------------------------------------------------------------------- claim
def uses_row_locks(session: Session) -> bool:
    """True when the session's database has row locks with SKIP LOCKED (PostgreSQL)."""
    return session.get_bind().dialect.name == "postgresql"


def _runnable(now: datetime) -> tuple[ColumnElement[bool], ...]:
    """The conditions of a claimable job: queued, its backoff passed."""
    return (Job.state == JobState.QUEUED, or_(Job.not_before.is_(None), Job.not_before <= now))


def _take(session: Session, job_id: int, worker_id: str, now: datetime) -> bool:
    """The conditional UPDATE of a claim (not committed); True when this worker won the job."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED)
        .values(
            state=JobState.REGISTERING,
            worker_id=worker_id,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            updated_at=now,
            not_before=None,
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def claim_next(sessions: sessionmaker[Session], worker_id: str) -> int | None:
    """Atomically claim the oldest runnable queued job; its id, or None when there is none.

    On PostgreSQL the row is locked with ``FOR UPDATE SKIP LOCKED`` (claims of several workers
    never queue behind each other); on SQLite candidates are tried with a conditional UPDATE.
    Either way two workers racing for one job never both win.
    """
    now = utcnow()
    with sessions() as session:
        oldest = select(Job.id).where(*_runnable(now)).order_by(Job.id)
        if uses_row_locks(session):
            job_id = session.scalar(oldest.limit(1).with_for_update(skip_locked=True))
            candidates = [] if job_id is None else [job_id]
        else:
            candidates = list(session.scalars(oldest.limit(CLAIM_CANDIDATES)).all())
        for candidate in candidates:
            won = _take(session, candidate, worker_id, now)
            session.commit()
            if won:
                log.info("job %d claimed by worker %s", candidate, worker_id)
                return int(candidate)
        session.rollback()
    return None


def heartbeat(sessions: sessionmaker[Session], job_id: int, worker_id: str) -> bool:
    """Refresh the job's lease; False when this worker no longer owns it (cancelled, requeued)."""
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state.in_(ACTIVE_JOB_STATES))
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return rowcount(result) == 1


def enter_stage(
    sessions: sessionmaker[Session], job_id: int, worker_id: str, stage: JobState
) -> bool:
    """Move an owned job to ``stage``, closing the open stage record; False if not owned."""
    if stage not in ACTIVE_JOB_STATES:
        raise ValueError(f"not a job stage: {stage}")
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state.in_(ACTIVE_JOB_STATES))
            .values(state=stage, heartbeat_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if rowcount(result) != 1:
            session.rollback()
            return False
        job = session.get(Job, job_id)
        attempt = job.attempts if job is not None else 1
        close_open_stages(session, job_id, now)
        session.add(JobStage(job_id=job_id, attempt=attempt, stage=stage, started_at=now))
        session.commit()
        return True


def close_open_stages(
    session: Session, job_id: int, now: datetime, error: str | None = None
) -> None:
    """End the job's open stage records at ``now`` (with ``error`` when the stage failed)."""
    for st in session.scalars(
        select(JobStage).where(JobStage.job_id == job_id, JobStage.finished_at.is_(None))
    ):
        st.finished_at = now
        st.seconds = max(0.0, (now - st.started_at).total_seconds())
        if error is not None:
            st.error = error


def set_output_dir(sessions: sessionmaker[Session], job_id: int, output_dir: str) -> None:
    """Record where the job's derived files live."""
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(output_dir=output_dir, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()


# --------------------------------------------------------------------------- outcome
def release_to_sends(sessions: sessionmaker[Session], job_id: int, worker_id: str) -> bool:
    """The worker is done with the job's first send round: leave it to send retries.

    The job stays in ``sending`` without an owner; :func:`finish_if_sent` closes it.
    """
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == JobState.SENDING)
            .values(worker_id=None, heartbeat_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        close_open_stages(session, job_id, now)
        session.commit()
        return rowcount(result) == 1


def finish_if_sent(sessions: sessionmaker[Session], job_id: int) -> JobState | None:
    """Mark an unowned ``sending`` job done (all sends done) or failed (a send failed for good).

    Returns the new state, or None when sends are still open.
    """
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.SENDING or job.worker_id is not None:
            return None
        if any(s.state in OPEN_SEND_STATES for s in job.sends):
            return None
        failed = [s for s in job.sends if s.state == SendState.FAILED]
        new_state = JobState.FAILED if failed else JobState.DONE
        values: dict[str, Any] = {"state": new_state, "updated_at": now, "finished_at": now}
        if failed:
            values["error"] = "; ".join(
                f"send to {s.destination} failed after {s.attempts} attempts: {s.last_error}"
                for s in failed
            )
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.SENDING, Job.worker_id.is_(None))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        close_open_stages(session, job_id, now)
        session.commit()
        if rowcount(result) != 1:
            return None
        log.info("job %d %s", job_id, new_state)
        return new_state


def fail_attempt(
    sessions: sessionmaker[Session],
    job_id: int,
    worker_id: str,
    error: str,
    cfg: Settings,
    *,
    retryable: bool = True,
) -> JobState | None:
    """Record a failed attempt: back to ``queued`` with backoff, or ``failed`` when exhausted
    (or at once when not ``retryable``: the same input would fail the same way again).

    Returns the new state, or None when the worker no longer owned the job.
    """
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.worker_id != worker_id or job.state not in ACTIVE_JOB_STATES:
            return None
        exhausted = not retryable or job.attempts >= cfg.max_attempts
        values: dict[str, Any] = {
            "worker_id": None,
            "heartbeat_at": None,
            "updated_at": now,
            "error": error[:MAX_ERROR_CHARS],
        }
        if exhausted:
            values.update(state=JobState.FAILED, finished_at=now)
        else:
            delay = cfg.backoff(job.attempts)
            values.update(state=JobState.QUEUED, not_before=now + timedelta(seconds=delay))
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        close_open_stages(session, job_id, now, error=error[:MAX_ERROR_CHARS])
        session.commit()
        if rowcount(result) != 1:
            return None
        new_state = JobState(values["state"])
        log.warning("job %d attempt %d failed (%s): %s", job_id, job.attempts, new_state, error)
        return new_state


def hand_back(sessions: sessionmaker[Session], job_id: int, worker_id: str) -> bool:
    """Requeue a job its worker abandons on shutdown, without counting the attempt.

    Returns False when the worker no longer owned the job (nothing changed).
    """
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state.in_(ACTIVE_JOB_STATES))
            .values(
                state=JobState.QUEUED,
                worker_id=None,
                heartbeat_at=None,
                updated_at=now,
                attempts=Job.attempts - 1,
            )
            .execution_options(synchronize_session=False)
        )
        close_open_stages(session, job_id, now, error="worker stopping")
        session.commit()
    handed = rowcount(result) == 1
    if handed:
        log.info("job %d handed back to the queue (worker stopping)", job_id)
    return handed
