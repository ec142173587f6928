"""Transitions an admin asks for: retry, cancel, accept a refused registration.

They come from the CLI or the console.

They return a sentence for the admin rather than raising on "nothing to do", because asking to
retry a running job is a normal question with a normal answer. An unknown job id raises
:class:`KeyError`.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import RegistrationUnreliableError
from dicom_node.models import Job, Send, utcnow
from dicom_node.orchestration.jobs.lifecycle import close_open_stages, rowcount
from dicom_node.states import TERMINAL_JOB_STATES, JobState, SendState

log = logging.getLogger(__name__)

UNRELIABLE_ERROR_PREFIX = f"{RegistrationUnreliableError.__name__}:"
"""How a job's error begins when its registration was refused (the worker records
``"<class name>: <message>"``)."""

REVIEWER_MAX = 128
"""Longest reviewer name recorded (the column's width)."""


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
        waiting_sends = job.state == JobState.SENDING and job.worker_id is None
        if job.state not in TERMINAL_JOB_STATES and not waiting_sends:
            return f"job {job_id} is {job.state}: nothing to retry"
        if not _requeue(session, job, now):
            return f"job {job_id} changed meanwhile; try again"
        return f"job {job_id} queued again"


def _requeue(session: Session, job: Job, now: datetime, **values: object) -> bool:
    """Queue ``job`` again with a fresh attempt count (and ``values``); its unfinished sends
    start over. Commits; False when the job changed state meanwhile."""
    for send in job.sends:
        if send.state != SendState.DONE:
            send.state = SendState.PENDING
            send.attempts = 0
            send.next_attempt_at = None
            send.worker_id = None
            send.updated_at = now
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == job.state)
        .values(
            state=JobState.QUEUED,
            attempts=0,
            error=None,
            worker_id=None,
            heartbeat_at=None,
            not_before=None,
            finished_at=None,
            updated_at=now,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(result) == 1


def accept_registration(sessions: sessionmaker[Session], job_id: int, *, by: str) -> str:
    """A person reviewed the QA series of a job whose registration the reliability check
    refused, and accepts it: the job is queued again with ``by`` and the time recorded, and
    the worker delivers that registration; every derived object carries the check's reasons
    and the acceptance among its warnings. Only a job that failed for an unreliable
    registration can be accepted. Returns a message for the person; unknown id: KeyError.
    """
    reviewer = " ".join(by.split())[:REVIEWER_MAX]
    if not reviewer:
        raise ValueError("the reviewer's name is empty")
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state != JobState.FAILED or not (job.error or "").startswith(
            UNRELIABLE_ERROR_PREFIX
        ):
            return (
                f"job {job_id} is {job.state} and did not fail for an unreliable registration: "
                "nothing to accept"
            )
        values = {"registration_accepted_by": reviewer, "registration_accepted_at": now}
        if not _requeue(session, job, now, **values):
            return f"job {job_id} changed meanwhile; try again"
    log.warning("job %d: unreliable registration accepted by %s after review", job_id, reviewer)
    return (
        f"job {job_id}: registration accepted by {reviewer}; queued to deliver it, "
        "with the warning in every description"
    )


def cancel_job(sessions: sessionmaker[Session], job_id: int) -> str:
    """Cancel a job that is not finished; a running worker notices at its next heartbeat."""
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state in TERMINAL_JOB_STATES:
            return f"job {job_id} is already {job.state}"
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.not_in(TERMINAL_JOB_STATES))
            .values(
                state=JobState.CANCELLED,
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
            .where(Send.job_id == job_id, Send.state.in_((SendState.PENDING, SendState.RETRY)))
            .values(state=SendState.FAILED, last_error="job cancelled", updated_at=now)
            .execution_options(synchronize_session=False)
        )
        close_open_stages(session, job_id, now, error="cancelled")
        session.commit()
        if rowcount(result) != 1:
            return f"job {job_id} changed meanwhile; try again"
        return f"job {job_id} cancelled"
