"""Job lifecycle: atomic claims, stages, hand-back and the outcome of an attempt."""

from __future__ import annotations

import threading

from sqlalchemy import select

from dicom_node.models import Job, JobStage
from dicom_node.orchestration import jobs
from dicom_node.states import JobState
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs

LOCK_WAIT_LIMIT_S = 10.0
"""How long a claim may take while another transaction holds a row lock (it must not wait)."""


def test_claim_is_atomic_across_threads(indexed_node: IndexedNode) -> None:
    node = indexed_node
    ids = make_jobs(node, 20)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            got = jobs.claim_next(node.sessions, name)
            if got is None:
                return
            with lock:
                claimed.append(got)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == ids  # every job exactly once


def test_stage_changes_need_ownership(indexed_node: IndexedNode) -> None:
    node = indexed_node
    (job_id,) = make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "w") == job_id
    assert jobs.enter_stage(node.sessions, job_id, "w", JobState.FUSING)
    assert not jobs.enter_stage(node.sessions, job_id, "someone-else", JobState.WRITING)
    with node.sessions() as s:
        stages = s.scalars(select(JobStage).where(JobStage.job_id == job_id)).all()
        assert [st.stage for st in stages] == [JobState.FUSING]
        assert s.get(Job, job_id).state is JobState.FUSING  # type: ignore[union-attr]


def test_hand_back_requeues_without_counting_the_attempt(indexed_node: IndexedNode) -> None:
    node = indexed_node
    (job_id,) = make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "w") == job_id
    assert jobs.enter_stage(node.sessions, job_id, "w", JobState.FUSING)
    assert not jobs.hand_back(node.sessions, job_id, "not-the-owner")
    assert jobs.hand_back(node.sessions, job_id, "w")
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.worker_id) == (JobState.QUEUED, 0, None)
        assert all(st.finished_at is not None for st in job.stages)
    assert jobs.claim_next(node.sessions, "w2") == job_id


def test_job_without_sends_is_done_once_released(indexed_node: IndexedNode) -> None:
    node = indexed_node
    (job_id,) = make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "w") == job_id
    assert jobs.enter_stage(node.sessions, job_id, "w", JobState.SENDING)
    assert jobs.finish_if_sent(node.sessions, job_id) is None  # its worker still holds it
    assert jobs.release_to_sends(node.sessions, job_id, "w")
    assert jobs.finish_if_sent(node.sessions, job_id) is JobState.DONE


def test_postgres_claim_skips_a_job_another_worker_is_claiming(postgres_node: IndexedNode) -> None:
    """FOR UPDATE SKIP LOCKED: a row locked by another worker's claim is passed over at once
    (a plain conditional UPDATE would wait for that worker's transaction)."""
    node = postgres_node
    first, second = make_jobs(node, 2)
    claimed: list[int | None] = []
    with node.engine.connect() as other:  # another worker in the middle of claiming `first`
        other.execute(select(Job.id).where(Job.id == first).with_for_update())
        thread = threading.Thread(
            target=lambda: claimed.append(jobs.claim_next(node.sessions, "b"))
        )
        thread.start()
        thread.join(LOCK_WAIT_LIMIT_S)
        assert not thread.is_alive(), "claim_next waited for a locked row"
        assert claimed == [second]
        other.rollback()
    assert jobs.claim_next(node.sessions, "c") == first
    assert jobs.claim_next(node.sessions, "d") is None
