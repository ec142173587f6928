"""A job's whole life through the jobs package: attempts, failure, recovery, admin actions."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from dicom_node import models
from dicom_node.models import Job
from dicom_node.orchestration import jobs
from dicom_node.states import JobState
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs


def test_failures_retry_then_fail_and_recovery(indexed_node: IndexedNode) -> None:
    node = indexed_node
    cfg = jobs.Settings.from_config(node.config)
    (job_id,) = make_jobs(node, 1)
    for attempt in range(1, cfg.max_attempts + 1):
        with node.sessions() as s:
            s.execute(update(Job).values(not_before=None))
            s.commit()
        assert jobs.claim_next(node.sessions, "w") == job_id
        assert jobs.enter_stage(node.sessions, job_id, "w", JobState.FUSING)
        state = jobs.fail_attempt(node.sessions, job_id, "w", f"boom {attempt}", cfg)
        assert state == (JobState.FAILED if attempt == cfg.max_attempts else JobState.QUEUED)
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.error == "boom 3" and len(job.stages) >= 3
    # a data error fails at once
    (data_job,) = make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "w") == data_job
    assert (
        jobs.fail_attempt(node.sessions, data_job, "w", "SeriesError", cfg, retryable=False)
        == JobState.FAILED
    )
    # the next job is not blocked by the failed ones
    (other,) = make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "w2") == other
    # worker dies: its heartbeat goes stale and the job is requeued
    with node.sessions() as s:
        stale = models.utcnow() - timedelta(hours=1)
        s.execute(update(Job).where(Job.id == other).values(heartbeat_at=stale))
        s.commit()
    assert jobs.heartbeat(node.sessions, other, "w-other") is False
    assert jobs.recover_stale(node.sessions, cfg) == [other]
    assert jobs.claim_next(node.sessions, "w3") == other
    # admin retry / cancel
    assert "queued again" in jobs.retry_job(node.sessions, job_id)
    assert "cancelled" in jobs.cancel_job(node.sessions, other)
    assert jobs.heartbeat(node.sessions, other, "w3") is False  # the worker notices
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED and job.attempts == 0
