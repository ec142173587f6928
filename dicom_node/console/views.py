"""What the dashboard, the jobs pages and the REST API show, read from the index.

Every function takes an open session and returns the models of :mod:`.schemas`; the pages and
the API share them, so both always show the same thing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.console.recentlog import LogLine
from dicom_node.console.schemas import (
    Dashboard,
    DiskView,
    ErrorView,
    JobDetail,
    JobSummary,
    SendView,
    SeriesView,
    StageView,
)
from dicom_node.models import Instance, Job, JobStage, Send, Series, utcnow
from dicom_node.states import ACTIVE_JOB_STATES, JobState, SendState, SeriesState
from dicom_node.storage.derived import PREVIEW, job_dir, manifest_info

MB = 1024 * 1024
DEFAULT_JOB_LIMIT = 100
RECENT_SERIES = 30
RECENT_JOBS = 10
RECENT_ERRORS = 20
ERROR_HOURS = 24
"""Failed jobs and sends of the last this many hours are the dashboard's recent errors."""

STAGE_NAMES: dict[JobState, str] = {
    JobState.REGISTERING: "register",
    JobState.FUSING: "fuse",
    JobState.WRITING: "derive",
    JobState.SENDING: "send",
}
"""The pipeline stage each active job state stands for (dashboard, metrics labels)."""


def as_utc(when: datetime | None) -> datetime | None:
    """A naive UTC time of the index as an aware UTC time (JSON ``...Z``)."""
    return None if when is None else when.replace(tzinfo=UTC)


def _send_view(s: Send) -> SendView:
    return SendView(
        destination=s.destination,
        kinds=[k for k in s.kinds.split(",") if k],
        state=s.state,
        acked=s.acked,
        total=s.total,
        attempts=s.attempts,
        next_attempt_at=as_utc(s.next_attempt_at),
        last_error=s.last_error,
        updated_at=as_utc(s.updated_at),
    )


def _stage_seconds(stages: Iterable[JobStage]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for st in stages:
        if st.seconds is not None:
            name = STAGE_NAMES.get(st.stage, str(st.stage))
            totals[name] = round(totals.get(name, 0.0) + st.seconds, 3)
    return totals


def _running_seconds(job: Job, now: datetime) -> float | None:
    if job.state not in ACTIVE_JOB_STATES:
        return None
    open_stages = [st for st in job.stages if st.finished_at is None]
    since = open_stages[-1].started_at if open_stages else job.updated_at
    return round(max(0.0, (now - since).total_seconds()), 1)


def _descriptions(session: Session, uids: Iterable[str]) -> dict[str, str | None]:
    wanted = sorted(set(uids))
    if not wanted:
        return {}
    rows = session.execute(
        select(Series.series_instance_uid, Series.series_description).where(
            Series.series_instance_uid.in_(wanted)
        )
    ).all()
    return {uid: desc for uid, desc in rows}


def _summary_fields(job: Job, desc: dict[str, str | None], now: datetime) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "patient_id": job.patient_id,
        "ct_series_uid": job.ct_series_uid,
        "mr_series_uid": job.mr_series_uid,
        "ct_description": desc.get(job.ct_series_uid),
        "mr_description": desc.get(job.mr_series_uid),
        "created_at": as_utc(job.created_at),
        "updated_at": as_utc(job.updated_at),
        "finished_at": as_utc(job.finished_at),
        "attempts": job.attempts,
        "stage_seconds": _stage_seconds(job.stages),
        "running_seconds": _running_seconds(job, now),
        "error": job.error,
        "sends": [_send_view(s) for s in job.sends],
    }


def summaries(session: Session, jobs: Sequence[Job]) -> list[JobSummary]:
    """Jobs as list rows (one query for all their series descriptions)."""
    desc = _descriptions(session, [u for j in jobs for u in (j.ct_series_uid, j.mr_series_uid)])
    now = utcnow()
    return [JobSummary(**_summary_fields(j, desc, now)) for j in jobs]


def list_jobs(
    session: Session, *, state: JobState | None = None, limit: int = DEFAULT_JOB_LIMIT
) -> list[JobSummary]:
    """The newest jobs (optionally in one state), newest first."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Job.state == state)
    return summaries(session, session.scalars(query).all())


def preview_path(config: NodeConfig, job_id: int) -> Path:
    """Where a job's preview PNG is (under ``storage.root``, never from the database)."""
    return job_dir(config, job_id) / PREVIEW


def job_detail(session: Session, config: NodeConfig, job_id: int) -> JobDetail | None:
    """One job with its stages, sends, registration quality, warnings and preview."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    desc = _descriptions(session, (job.ct_series_uid, job.mr_series_uid))
    info = manifest_info(job_dir(config, job_id))
    quality = info.get("quality")
    return JobDetail(
        **_summary_fields(job, desc, utcnow()),
        issuer_of_patient_id=job.issuer_of_patient_id,
        pairing_reason=job.pairing_reason,
        revision=job.revision,
        ct_revision=job.ct_revision,
        mr_revision=job.mr_revision,
        worker_id=job.worker_id,
        heartbeat_at=as_utc(job.heartbeat_at),
        not_before=as_utc(job.not_before),
        cleaned_at=as_utc(job.cleaned_at),
        stages=[
            StageView(
                attempt=st.attempt,
                state=st.stage,
                name=STAGE_NAMES.get(st.stage, str(st.stage)),
                started_at=as_utc(st.started_at) or st.started_at,
                finished_at=as_utc(st.finished_at),
                seconds=st.seconds,
                error=st.error,
            )
            for st in job.stages
        ],
        quality=quality if isinstance(quality, dict) else {},
        warnings=[str(w) for w in info.get("warnings") or []],
        pipeline_seconds={str(k): float(v) for k, v in (info.get("stage_seconds") or {}).items()},
        has_preview=preview_path(config, job_id).is_file(),
    )


def disk_view(config: NodeConfig) -> DiskView:
    """Free space on the storage disk (the nearest existing folder) against the floor."""
    path = config.storage.root
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    floor = config.storage.min_free_mb * MB
    return DiskView(
        path=str(config.storage.root),
        free_bytes=usage.free,
        total_bytes=usage.total,
        min_free_bytes=floor,
        ok=usage.free >= floor,
    )


def count_by(session: Session, column: Any, values: Iterable[Any]) -> dict[str, int]:
    """Rows per value of a state column, every known value present (0 when none)."""
    counts = {str(v): 0 for v in values}
    for value, n in session.execute(select(column, func.count()).group_by(column)).all():
        counts[str(value)] = int(n)
    return counts


def _local_midnight_utc() -> datetime:
    """Start of the node's local day as naive UTC (the index's times)."""
    local = datetime.now().astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.astimezone(UTC).replace(tzinfo=None)


def recent_series(session: Session, limit: int = RECENT_SERIES) -> list[SeriesView]:
    """The series that received instances most recently, with their completion state."""
    rows = session.scalars(select(Series).order_by(Series.last_received_at.desc()).limit(limit))
    return [
        SeriesView(
            series_instance_uid=s.series_instance_uid,
            modality=s.modality,
            description=s.series_description,
            instances=s.number_of_instances,
            calling_aet=s.calling_aet,
            state=s.state,
            first_received_at=as_utc(s.first_received_at) or s.first_received_at,
            last_received_at=as_utc(s.last_received_at) or s.last_received_at,
            completed_at=as_utc(s.completed_at),
        )
        for s in rows
    ]


def recent_errors(session: Session, log_lines: Sequence[LogLine]) -> list[ErrorView]:
    """Failed jobs and sends of the last day and the process's last warnings, newest first."""
    since = utcnow() - timedelta(hours=ERROR_HOURS)
    errors = [
        ErrorView(at=as_utc(j.updated_at) or j.updated_at, source=f"job {j.id}", message=j.error)
        for j in session.scalars(
            select(Job).where(Job.state == JobState.FAILED, Job.updated_at >= since)
        )
        if j.error
    ]
    errors += [
        ErrorView(
            at=as_utc(s.updated_at) or s.updated_at,
            source=f"job {s.job_id} send to {s.destination}",
            message=s.last_error or s.state,
        )
        for s in session.scalars(
            select(Send).where(
                Send.state.in_((SendState.FAILED, SendState.RETRY)), Send.updated_at >= since
            )
        )
    ]
    errors += [
        ErrorView(at=line.at, source=f"{line.level} {line.logger}", message=line.message)
        for line in log_lines
    ]
    errors.sort(key=lambda e: e.at, reverse=True)
    return errors[:RECENT_ERRORS]


def dashboard(
    session: Session,
    config: NodeConfig,
    *,
    worker_alive: Callable[[], bool | None],
    log_lines: Sequence[LogLine] = (),
) -> Dashboard:
    """Everything the dashboard shows, from the index, this process's counters and the disk."""
    active = session.scalars(
        select(Job).where(Job.state.in_(ACTIVE_JOB_STATES)).order_by(Job.id)
    ).all()
    recent = session.scalars(select(Job).order_by(Job.id.desc()).limit(RECENT_JOBS)).all()
    instances_today = session.scalar(
        select(func.count())
        .select_from(Instance)
        .where(Instance.received_at >= _local_midnight_utc())
    )
    return Dashboard(
        generated_at=datetime.now(UTC),
        associations_today=metrics.associations_today(),
        instances_today=int(instances_today or 0),
        series_by_state=count_by(session, Series.state, SeriesState),
        recent_series=recent_series(session),
        jobs_by_state=count_by(session, Job.state, JobState),
        active_jobs=summaries(session, active),
        recent_jobs=summaries(session, recent),
        disk=disk_view(config),
        worker_alive=worker_alive(),
        errors=recent_errors(session, log_lines),
    )
