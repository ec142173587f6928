"""Transitions an admin asks for: retry and cancel (from the CLI or the console).

They return a sentence for the admin rather than raising on "nothing to do", because asking to
retry a running job is a normal question with a normal answer. An unknown job id raises
:class:`KeyError`.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import Job, Send, utcnow
from dicom_node.orchestration.jobs.lifecycle import close_open_stages, rowcount
from dicom_node.states import TERMINAL_JOB_STATES, JobState, SendState


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
        for send in job.sends:
            if send.state != SendState.DONE:
                send.state = SendState.PENDING
                send.attempts = 0
                send.next_attempt_at = None
                send.worker_id = None
                send.updated_at = now
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == job.state)
            .values(
                state=JobState.QUEUED,
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
        if rowcount(result) != 1:
            return f"job {job_id} changed meanwhile; try again"
        return f"job {job_id} queued again"


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
