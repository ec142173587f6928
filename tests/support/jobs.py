"""Jobs made directly in a test index, without pairing (for job and dispatch tests)."""

from __future__ import annotations

from sqlalchemy import select

from dicom_node.models import Job
from dicom_node.orchestration import jobs
from tests.support.indexed import IndexedNode


def make_jobs(node: IndexedNode, n: int) -> list[int]:
    """Create ``n`` queued jobs of made-up series; their ids."""
    ids = []
    with node.sessions() as s:
        for i in range(n):
            job = jobs.create_job(
                s,
                patient_id="P",
                issuer_of_patient_id="",
                ct_series_uid=f"1.{i}",
                mr_series_uid=f"2.{i}",
                ct_revision=1,
                mr_revision=1,
                pairing_reason="test",
            )
            ids.append(job.id)
        s.commit()
    return ids


def all_jobs(node: IndexedNode) -> list[Job]:
    """Every job of the index, oldest first."""
    with node.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)).all())
