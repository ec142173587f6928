"""What pages and API show, read from a real index: jobs, series, disk, recent errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.console import views
from dicom_node.console.recentlog import LogLine
from dicom_node.models import Job, JobStage, utcnow
from dicom_node.states import JobState, SeriesState
from tests.support.console import QUALITY, make_finished_job
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs


def test_job_summaries_and_detail(indexed_node: IndexedNode) -> None:
    job_id = make_finished_job(indexed_node)
    with indexed_node.sessions() as s:
        (row,) = views.list_jobs(s)
        detail = views.job_detail(s, indexed_node.config, job_id)
        assert views.job_detail(s, indexed_node.config, 999) is None
    assert row.id == job_id and row.state == JobState.DONE
    assert row.stage_seconds == {"register": 7.0, "fuse": 4.5, "derive": 3.0, "send": 1.5}
    assert row.running_seconds is None
    assert detail is not None and detail.quality == QUALITY and detail.has_preview
    assert [st.name for st in detail.stages] == ["register", "fuse", "derive", "send"]
    assert detail.created_at.tzinfo is not None  # UTC, marked as such


def test_running_job_shows_time_in_its_stage(indexed_node: IndexedNode) -> None:
    (job_id,) = make_jobs(indexed_node, 1)
    with indexed_node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state = JobState.FUSING
        s.add(
            JobStage(
                job_id=job_id,
                attempt=1,
                stage=JobState.FUSING,
                started_at=utcnow() - timedelta(seconds=30),
            )
        )
        s.commit()
        (row,) = views.list_jobs(s, state=JobState.FUSING)
    assert row.running_seconds is not None and 29 <= row.running_seconds < 120


def test_dashboard_series_and_errors(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    n_ct = indexed_node.ingest(SMALL_CT, aet="CT_SIM")
    indexed_node.ingest(SMALL_MR, aet="MR_3T")
    make_finished_job(indexed_node, state=JobState.FAILED, error="registration unreliable")
    line = LogLine(at=datetime.now(UTC), level="WARNING", logger="x", message="disk slow")
    with indexed_node.sessions() as s:
        d = views.dashboard(s, indexed_node.config, worker_alive=lambda: False, log_lines=[line])
    assert d.worker_alive is False
    assert d.series_by_state == {SeriesState.RECEIVING: 2, SeriesState.COMPLETE: 0}
    assert {s.calling_aet for s in d.recent_series} == {"CT_SIM", "MR_3T"}
    ct = next(s for s in d.recent_series if s.modality == "CT")
    assert ct.instances == n_ct
    assert d.instances_today >= n_ct
    assert d.jobs_by_state["failed"] == 1
    sources = [e.source for e in d.errors]
    assert any(src.startswith("job ") and "send" not in src for src in sources)
    assert any(src.endswith("send to TPS") for src in sources)  # the failed send
    assert any(e.message == "disk slow" for e in d.errors)


def test_disk_view_against_the_floor(tmp_path: Path) -> None:
    cfg = NodeConfig.model_validate({"storage": {"root": str(tmp_path / "x" / "y")}})
    disk = views.disk_view(cfg)  # a folder not made yet: its nearest parent's disk
    assert disk.free_bytes > 0 and disk.ok
    huge = NodeConfig.model_validate({"storage": {"root": str(tmp_path), "min_free_mb": 10**12}})
    assert not views.disk_view(huge).ok
