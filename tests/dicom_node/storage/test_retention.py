"""Retention: old done jobs lose their files and rows; off by default."""

from __future__ import annotations

from datetime import timedelta

from dicom_node import models
from dicom_node.models import Job
from dicom_node.orchestration import pairing
from dicom_node.states import JobState
from dicom_node.storage import retention
from dicom_node.storage.derived import job_dir
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.indexed import IndexedNode
from tests.support.time import later


def test_retention_cleans_old_done_jobs(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(SMALL_CT)
    node.ingest(SMALL_MR)
    (job_id,) = pairing.scan(node.sessions, node.config, now=later()).jobs
    folder = job_dir(node.config, job_id)
    folder.mkdir(parents=True)
    (folder / "x.dcm").write_bytes(b"x")
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.finished_at = JobState.DONE, models.utcnow() - timedelta(days=40)
        s.commit()
    assert retention.clean(node.sessions, node.config).jobs == []  # off by default
    cfg = node.config.model_copy(
        update={"retention": node.config.retention.model_copy(update={"enabled": True, "days": 30})}
    )
    result = retention.clean(node.sessions, cfg)
    assert result.jobs == [job_id] and len(result.series) == 2
    assert not folder.exists()
    assert not any(node.config.storage.root.rglob("*.dcm"))
    assert retention.clean(node.sessions, cfg).jobs == []
