"""Dispatch: per-destination sends, their retries and the job's outcome."""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.models import Job, Send
from dicom_node.orchestration import dispatch, jobs
from dicom_node.states import DerivedKind, JobState, SendState
from dicom_node.storage.derived import DerivedFile, job_dir, read_manifest, write_manifest
from tests.peers import free_port
from tests.support.data import SMALL_CT, require_small_fixtures
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs


def _dest_config(node: IndexedNode, port: int, **jobs_kw: object) -> NodeConfig:
    data = node.config.model_dump(mode="json")
    data["destinations"] = {
        "pacs": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": port},
        "tps": {"ae_title": "NOBODY2", "host": "127.0.0.1", "port": port, "send": ["reg"]},
    }
    data["routing"] = {"send_to": ["pacs", "tps"]}
    data["jobs"] = {**data["jobs"], **jobs_kw}
    return NodeConfig.model_validate(data)


def test_send_to_unreachable_destination_retries_then_fails(
    indexed_node: IndexedNode, tmp_path: Path
) -> None:
    require_small_fixtures()
    node = indexed_node
    config = _dest_config(node, free_port(), retry_backoff_seconds=0.0, send_max_attempts=2)
    (job_id,) = make_jobs(node, 1)
    folder = job_dir(config, job_id)
    (folder / "fused").mkdir(parents=True)
    (folder / "reg").mkdir(parents=True)
    src = sorted(SMALL_CT.glob("*.dcm"))[:2]
    files = []
    for i, f in enumerate(src):
        kind = DerivedKind.FUSED if i == 0 else DerivedKind.REG
        dst = folder / kind / f.name
        dst.write_bytes(f.read_bytes())
        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        files.append(DerivedFile(kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), dst))
    write_manifest(folder, files, {"job": job_id})
    assert read_manifest(folder) == files
    assert jobs.claim_next(node.sessions, "w") == job_id
    assert jobs.enter_stage(node.sessions, job_id, "w", JobState.SENDING)
    states = dispatch.send_job(node.sessions, config, job_id, "w", files)
    assert states == {"pacs": SendState.RETRY, "tps": SendState.RETRY}
    with node.sessions() as s:
        totals = {x.destination: x.total for x in s.scalars(select(Send)).all()}
    assert totals == {"pacs": 2, "tps": 1}  # the TPS gets only the REG kind
    assert jobs.release_to_sends(node.sessions, job_id, "w")
    assert jobs.finish_if_sent(node.sessions, job_id) is None  # sends still retrying
    assert dispatch.retry_due_sends(node.sessions, config, "sched") == 2
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.FAILED and "pacs" in (job.error or "")
