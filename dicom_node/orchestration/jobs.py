"""Fusion job states, atomic claim, stage bookkeeping, retries and restart recovery.

A job is one CT-MR pair. Its life::

    queued -> registering -> fusing -> writing -> sending -> done
       ^          |            |          |          |
       +----------+------------+----------+          +--> (sends wait in retry) --> done | failed
       (attempt failed or worker lost: back to queued with backoff, or failed after
        ``jobs.max_attempts``)

``cancelled`` is a terminal state set by an admin. Every transition made by a worker is an
``UPDATE ... WHERE id=? AND worker_id=?`` so a worker that lost its job (lease expired,
cancelled) cannot overwrite what another process decided. Claiming is
``UPDATE jobs SET state='registering', worker_id=? WHERE id=? AND state='queued'`` with a
rowcount check: no two workers ever take one job, on SQLite and on PostgreSQL alike.

A claimed job carries a heartbeat (``heartbeat_at``) refreshed by its worker; a job in an
active state whose heartbeat is older than ``jobs.lease_seconds`` belongs to a dead worker
(SIGKILL, OOM, power loss) and :func:`recover_stale` puts it back in the queue.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.models import Job, JobStage, Send, utcnow

log = logging.getLogger(__name__)

QUEUED = "queued"
REGISTERING = "registering"
FUSING = "fusing"
WRITING = "writing"
SENDING = "sending"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

STATES: tuple[str, ...] = (QUEUED, REGISTERING, FUSING, WRITING, SENDING, DONE, FAILED, CANCELLED)
COMPUTE_STATES: tuple[str, ...] = (REGISTERING, FUSING, WRITING)
ACTIVE_STATES: tuple[str, ...] = (REGISTERING, FUSING, WRITING, SENDING)
TERMINAL_STATES: tuple[str, ...] = (DONE, FAILED, CANCELLED)

# Send states (one row per job and destination).
SEND_PENDING = "pending"
SEND_SENDING = "sending"
SEND_RETRY = "retry"
SEND_DONE = "done"
SEND_FAILED = "failed"


@dataclass(frozen=True)
class Settings:
    """Orchestration settings read from the config, with defaults for keys it may lack."""

    max_attempts: int
    retry_backoff_seconds: float
    max_backoff_seconds: float
    send_max_attempts: int
    lease_seconds: float
    heartbeat_seconds: float
    poll_seconds: float
    scan_interval_seconds: float


def _opt(section: Any, name: str, default: float) -> float:
    value = getattr(section, name, None)
    return float(default if value is None else value)


def settings(config: NodeConfig) -> Settings:
    """The orchestration settings of ``config`` (``jobs.*``, ``worker.poll_seconds``, ...)."""
    lease = _opt(config.jobs, "lease_seconds", 60.0)
    return Settings(
        max_attempts=int(config.jobs.max_attempts),
        retry_backoff_seconds=float(config.jobs.retry_backoff_seconds),
        max_backoff_seconds=_opt(config.jobs, "max_backoff_seconds", 3600.0),
        send_max_attempts=int(_opt(config.jobs, "send_max_attempts", 10)),
        lease_seconds=lease,
        heartbeat_seconds=_opt(config.jobs, "heartbeat_seconds", max(0.2, lease / 4.0)),
        poll_seconds=_opt(config.worker, "poll_seconds", 2.0),
        scan_interval_seconds=_opt(
            config.pairing,
            "scan_interval_seconds",
            min(5.0, max(0.2, config.pairing.series_quiet_seconds / 4.0)),
        ),
    )


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff before retry number ``attempt`` (1-based): base * 2**(attempt-1)."""
    if attempt < 1:
        return 0.0
    return float(min(cap, base * (2.0 ** min(attempt - 1, 30))))


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
        state=QUEUED,
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
def claim_next(sessions: sessionmaker[Session], worker_id: str) -> int | None:
    """Atomically claim the oldest runnable queued job; its id, or None when there is none.

    The claim is a conditional UPDATE checked by rowcount, so two workers racing for one job
    never both win (works on SQLite and PostgreSQL without row locks).
    """
    now = utcnow()
    with sessions() as session:
        candidates = session.scalars(
            select(Job.id)
            .where(Job.state == QUEUED, or_(Job.not_before.is_(None), Job.not_before <= now))
            .order_by(Job.id)
            .limit(10)
        ).all()
        for job_id in candidates:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == QUEUED)
                .values(
                    state=REGISTERING,
                    worker_id=worker_id,
                    heartbeat_at=now,
                    attempts=Job.attempts + 1,
                    updated_at=now,
                    not_before=None,
                )
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if _rowcount(result) == 1:
                log.info("job %d claimed by worker %s", job_id, worker_id)
                return int(job_id)
    return None


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def heartbeat(sessions: sessionmaker[Session], job_id: int, worker_id: str) -> bool:
    """Refresh the job's lease; False when this worker no longer owns it (cancelled, requeued)."""
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state.in_(ACTIVE_STATES))
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return _rowcount(result) == 1


def enter_stage(sessions: sessionmaker[Session], job_id: int, worker_id: str, stage: str) -> bool:
    """Move an owned job to ``stage``, closing the open stage record; False if not owned."""
    if stage not in ACTIVE_STATES:
        raise ValueError(f"not a job stage: {stage}")
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state.in_(ACTIVE_STATES))
            .values(state=stage, heartbeat_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) != 1:
            session.rollback()
            return False
        job = session.get(Job, job_id)
        attempt = job.attempts if job is not None else 1
        _close_open_stages(session, job_id, now)
        session.add(JobStage(job_id=job_id, attempt=attempt, stage=stage, started_at=now))
        session.commit()
        return True


def _close_open_stages(
    session: Session, job_id: int, now: datetime, error: str | None = None
) -> None:
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


def release_to_sends(sessions: sessionmaker[Session], job_id: int, worker_id: str) -> bool:
    """The worker is done with the job's first send round: leave it to send retries.

    The job stays in ``sending`` without an owner; :func:`finish_if_sent` closes it.
    """
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == SENDING)
            .values(worker_id=None, heartbeat_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        _close_open_stages(session, job_id, now)
        session.commit()
        return _rowcount(result) == 1


def finish_if_sent(sessions: sessionmaker[Session], job_id: int) -> str | None:
    """Mark an unowned ``sending`` job done (all sends done) or failed (a send failed for good).

    Returns the new state, or None when sends are still pending / retrying.
    """
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != SENDING or job.worker_id is not None:
            return None
        states = [s.state for s in job.sends]
        if any(s in (SEND_PENDING, SEND_SENDING, SEND_RETRY) for s in states):
            return None
        failed = [s for s in job.sends if s.state == SEND_FAILED]
        new_state = FAILED if failed else DONE
        values: dict[str, Any] = {"state": new_state, "updated_at": now, "finished_at": now}
        if failed:
            values["error"] = "; ".join(
                f"send to {s.destination} failed after {s.attempts} attempts: {s.last_error}"
                for s in failed
            )
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == SENDING, Job.worker_id.is_(None))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        _close_open_stages(session, job_id, now)
        session.commit()
        if _rowcount(result) != 1:
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
    permanent: bool = False,
) -> str | None:
    """Record a failed attempt: back to ``queued`` with backoff, or ``failed`` when exhausted
    (or at once when ``permanent``: the same input would fail the same way again).

    Returns the new state, or None when the worker no longer owned the job.
    """
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.worker_id != worker_id or job.state not in ACTIVE_STATES:
            return None
        exhausted = permanent or job.attempts >= cfg.max_attempts
        values: dict[str, Any] = {
            "worker_id": None,
            "heartbeat_at": None,
            "updated_at": now,
            "error": error[:4000],
        }
        if exhausted:
            values.update(state=FAILED, finished_at=now)
        else:
            delay = backoff_seconds(
                job.attempts, cfg.retry_backoff_seconds, cfg.max_backoff_seconds
            )
            values.update(state=QUEUED, not_before=now + timedelta(seconds=delay))
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        _close_open_stages(session, job_id, now, error=error[:4000])
        session.commit()
        if _rowcount(result) != 1:
            return None
        new_state = str(values["state"])
        log.warning("job %d attempt %d failed (%s): %s", job_id, job.attempts, new_state, error)
        return new_state


# --------------------------------------------------------------------------- recovery
def _local_owner_dead(worker_id: str | None, host: str) -> bool:
    """True when ``worker_id`` (host:pid:tag) names a process of this host that is gone."""
    parts = (worker_id or "").split(":")
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but not ours (EPERM): alive
        return False
    return False


def recover_stale(
    sessions: sessionmaker[Session], cfg: Settings, *, local_host: str | None = None
) -> list[int]:
    """Requeue (or fail, after ``max_attempts``) jobs whose worker's heartbeat is stale.

    With ``local_host`` (this machine's host name), jobs held by a worker process of this host
    that no longer exists are taken back at once, without waiting for the lease to expire
    (a restarted node resumes its interrupted job immediately). Also hands send rows stuck in
    ``sending`` by a dead process back to the retry queue. Safe to run from any process at any
    time. Returns the ids of the recovered jobs.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=cfg.lease_seconds)
    recovered: list[int] = []
    with sessions() as session:
        stale = list(
            session.scalars(
                select(Job).where(
                    Job.state.in_(ACTIVE_STATES),
                    Job.worker_id.is_not(None),
                    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                )
            ).all()
        )
        if local_host:
            held = session.scalars(
                select(Job).where(
                    Job.state.in_(ACTIVE_STATES),
                    Job.worker_id.like(f"{local_host}:%"),
                    Job.heartbeat_at >= cutoff,
                )
            ).all()
            stale.extend(j for j in held if _local_owner_dead(j.worker_id, local_host))
        for job in stale:
            exhausted = job.attempts >= cfg.max_attempts
            msg = (
                f"worker {job.worker_id} stopped answering during {job.state} "
                f"(attempt {job.attempts})"
            )
            values: dict[str, Any] = {
                "worker_id": None,
                "heartbeat_at": None,
                "updated_at": now,
                "error": msg,
            }
            if exhausted:
                values.update(state=FAILED, finished_at=now)
            else:
                values.update(state=QUEUED, not_before=None)
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job.id,
                    Job.worker_id == job.worker_id,
                    Job.state == job.state,
                    Job.heartbeat_at.is_(None)
                    if job.heartbeat_at is None
                    else Job.heartbeat_at == job.heartbeat_at,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) == 1:
                _close_open_stages(session, job.id, now, error=msg)
                recovered.append(job.id)
                log.warning("job %d: %s -> %s", job.id, msg, values["state"])
        stuck = [Send.state == SEND_SENDING]
        dead_sends: list[int] = []
        if local_host:
            dead_sends = [
                s.id
                for s in session.scalars(
                    select(Send).where(*stuck, Send.worker_id.like(f"{local_host}:%"))
                ).all()
                if _local_owner_dead(s.worker_id, local_host)
            ]
        session.execute(
            update(Send)
            .where(
                *stuck,
                or_(
                    Send.heartbeat_at.is_(None), Send.heartbeat_at < cutoff, Send.id.in_(dead_sends)
                ),
            )
            .values(state=SEND_RETRY, worker_id=None, heartbeat_at=None, next_attempt_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return recovered


# --------------------------------------------------------------------------- admin
def retry_job(sessions: sessionmaker[Session], job_id: int) -> str:
    """Put a failed, cancelled or done job back in the queue with a fresh attempt count.

    Its derived files and every destination's acknowledged instances are kept, so nothing
    that already arrived is computed or sent again. Returns a message for the admin.
    """
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise KeyError(job_id)
        waiting_sends = job.state == SENDING and job.worker_id is None
        if job.state not in TERMINAL_STATES and not waiting_sends:
            return f"job {job_id} is {job.state}: nothing to retry"
        for send in job.sends:
            if send.state != SEND_DONE:
                send.state = SEND_PENDING
                send.attempts = 0
                send.next_attempt_at = None
                send.worker_id = None
                send.updated_at = now
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == job.state)
            .values(
                state=QUEUED,
                attempts=0,
                error=None,
                worker_id=None,
                heartbeat_at=None,
                not_before=None,
                finished_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if _rowcount(result) != 1:
            return f"job {job_id} changed meanwhile; try again"
        return f"job {job_id} queued again"


def cancel_job(sessions: sessionmaker[Session], job_id: int) -> str:
    """Cancel a job that is not finished; a running worker notices at its next heartbeat."""
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state in TERMINAL_STATES:
            return f"job {job_id} is already {job.state}"
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.not_in(TERMINAL_STATES))
            .values(
                state=CANCELLED,
                worker_id=None,
                heartbeat_at=None,
                finished_at=now,
                updated_at=now,
                error="cancelled by admin",
            )
            .execution_options(synchronize_session=False)
        )
        session.execute(
            update(Send)
            .where(Send.job_id == job_id, Send.state.in_((SEND_PENDING, SEND_RETRY)))
            .values(state=SEND_FAILED, last_error="job cancelled", updated_at=now)
            .execution_options(synchronize_session=False)
        )
        _close_open_stages(session, job_id, now, error="cancelled")
        session.commit()
        if _rowcount(result) != 1:
            return f"job {job_id} changed meanwhile; try again"
        return f"job {job_id} cancelled"


def active_pair_job(session: Session, ct_series_uid: str, mr_series_uid: str) -> Job | None:
    """The newest job of a pair that is not failed or cancelled (queued, running or done)."""
    return session.scalars(
        select(Job)
        .where(
            and_(
                Job.ct_series_uid == ct_series_uid,
                Job.mr_series_uid == mr_series_uid,
                Job.state.not_in((FAILED, CANCELLED)),
            )
        )
        .order_by(Job.id.desc())
        .limit(1)
    ).first()
