"""Retention: delete source and derived data of jobs done ``retention.days`` ago (opt-in).

For every job that is ``done`` since more than ``retention.days`` days (and not cleaned yet):
its derived folder goes, and so do the files and index rows (instances, series, and studies /
patients left empty) of its CT and MR series, unless another job that is not yet old enough
or not finished still uses them. The job row stays, marked ``cleaned_at``, as the audit trail
of what was made and sent. Off unless ``retention.enabled``. Refusing new data when the disk
is nearly full is the SCP's part (``storage.min_free_mb``, status 0xA700).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.models import (
    Instance,
    Job,
    Patient,
    Series,
    SeriesProgress,
    Study,
    utcnow,
)
from dicom_node.states import JobState
from dicom_node.storage.derived import job_dir

log = logging.getLogger(__name__)


@dataclass
class CleanResult:
    """What one clean-up removed."""

    jobs: list[int] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    files: int = 0


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("retention: cannot delete %s: %s", path, exc)
        return False


def _series_still_needed(session: Session, uid: str, cutoff_ids: set[int]) -> bool:
    users = session.scalars(
        select(Job.id).where((Job.ct_series_uid == uid) | (Job.mr_series_uid == uid))
    ).all()
    return any(j not in cutoff_ids for j in users)


def _delete_series(session: Session, root: Path, uid: str) -> int:
    series = session.scalar(select(Series).where(Series.series_instance_uid == uid))
    removed = 0
    if series is not None:
        paths = session.scalars(select(Instance.path).where(Instance.series_pk == series.id)).all()
        for rel in paths:
            removed += _unlink(root / rel)
        session.execute(delete(Instance).where(Instance.series_pk == series.id))
        study_pk = series.study_pk
        folder = (root / paths[0]).parent if paths else None
        session.delete(series)
        session.flush()
        if folder is not None:
            for d in (folder, folder.parent):
                try:
                    d.rmdir()
                except OSError:
                    break
        if session.scalar(select(Series.id).where(Series.study_pk == study_pk).limit(1)) is None:
            study = session.get(Study, study_pk)
            if study is not None:
                patient_pk = study.patient_pk
                session.delete(study)
                session.flush()
                left = session.scalar(
                    select(Study.id).where(Study.patient_pk == patient_pk).limit(1)
                )
                if left is None:
                    patient = session.get(Patient, patient_pk)
                    if patient is not None:
                        session.delete(patient)
    session.execute(delete(SeriesProgress).where(SeriesProgress.series_uid == uid))
    return removed


def clean(sessions: sessionmaker[Session], config: NodeConfig) -> CleanResult:
    """Delete what retention allows now (no-op unless ``retention.enabled``)."""
    result = CleanResult()
    if not config.retention.enabled:
        return result
    now = utcnow()
    cutoff = now - timedelta(days=config.retention.days)
    root = config.storage.root
    with sessions() as session:
        old = session.scalars(
            select(Job).where(
                Job.state == JobState.DONE,
                Job.finished_at.is_not(None),
                Job.finished_at < cutoff,
                Job.cleaned_at.is_(None),
            )
        ).all()
        if not old:
            return result
        old_ids = {j.id for j in old}
        # Jobs cleaned before count as "old" too: their data is gone already.
        old_ids |= set(session.scalars(select(Job.id).where(Job.cleaned_at.is_not(None))).all())
        for job in old:
            folder = job_dir(config, job.id)
            if folder.exists():
                result.files += sum(1 for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
            for uid in (job.ct_series_uid, job.mr_series_uid):
                if uid in result.series or _series_still_needed(session, uid, old_ids):
                    continue
                result.files += _delete_series(session, root, uid)
                result.series.append(uid)
            job.cleaned_at = now
            result.jobs.append(job.id)
        session.commit()
    log.info(
        "retention: cleaned %d job(s), %d series, %d files (older than %d days)",
        len(result.jobs),
        len(result.series),
        result.files,
        config.retention.days,
    )
    return result
