"""Admin actions: retry keeps what was delivered, cancel stops open sends."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from dicom_node import models
from dicom_node.models import Job, Send, SentInstance
from dicom_node.orchestration import jobs
from dicom_node.states import JobState, SendState
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs


def _with_sends(node: IndexedNode, job_id: int) -> None:
    now = models.utcnow()
    with node.sessions() as s:
        done = Send(
            job_id=job_id,
            destination="A",
            kinds="fused",
            state=SendState.DONE,
            total=1,
            acked=1,
            updated_at=now,
        )
        failed = Send(
            job_id=job_id,
            destination="B",
            kinds="fused",
            state=SendState.FAILED,
            attempts=5,
            total=2,
            acked=1,
            updated_at=now,
        )
        s.add_all([done, failed])
        s.flush()
        s.add(SentInstance(send_id=failed.id, sop_instance_uid="2.25.1", acked_at=now))
        s.execute(
            Job.__table__.update()  # type: ignore[attr-defined]
            .where(Job.id == job_id)
            .values(state=JobState.FAILED, error="send to B failed")
        )
        s.commit()


def test_retry_requeues_and_keeps_acknowledged_instances(indexed_node: IndexedNode) -> None:
    node = indexed_node
    (job_id,) = make_jobs(node, 1)
    _with_sends(node, job_id)
    assert jobs.retry_job(node.sessions, job_id) == f"job {job_id} queued again"
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.state, job.attempts, job.error) == (
            JobState.QUEUED,
            0,
            None,
        )
        states = {x.destination: (x.state, x.attempts) for x in job.sends}
        assert states == {"A": (SendState.DONE, 0), "B": (SendState.PENDING, 0)}
        assert s.scalars(select(SentInstance.sop_instance_uid)).all() == ["2.25.1"]
    assert "nothing to retry" in jobs.retry_job(node.sessions, job_id)


def test_cancel_fails_open_sends_and_is_final(indexed_node: IndexedNode) -> None:
    node = indexed_node
    (job_id,) = make_jobs(node, 1)
    now = models.utcnow()
    with node.sessions() as s:
        s.add(
            Send(job_id=job_id, destination="A", kinds="reg", state=SendState.RETRY, updated_at=now)
        )
        s.commit()
    assert jobs.cancel_job(node.sessions, job_id) == f"job {job_id} cancelled"
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.CANCELLED
        assert [x.state for x in job.sends] == [SendState.FAILED]
    assert "already cancelled" in jobs.cancel_job(node.sessions, job_id)


def test_unknown_job_is_a_key_error(indexed_node: IndexedNode) -> None:
    with pytest.raises(KeyError):
        jobs.retry_job(indexed_node.sessions, 4242)
    with pytest.raises(KeyError):
        jobs.cancel_job(indexed_node.sessions, 4242)
