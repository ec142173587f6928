"""Series completion: a series is complete once no instance arrived for its quiet period.

The quiet period is ``pairing.series_quiet_seconds`` (``pairing.per_aet_quiet_seconds[calling
AE]`` overrides it). Each completion that changed the series' content (a fingerprint over its
SOPInstanceUIDs and their digests) raises the series' revision; an identical re-send changes
nothing. This module is the one place where a series' state changes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dicom_node.config import NodeConfig
from dicom_node.models import Instance, Series, SeriesProgress
from dicom_node.states import SeriesState

log = logging.getLogger(__name__)


def fingerprint(session: Session, series_pk: int) -> tuple[str, int]:
    """Digest over the series' (SOPInstanceUID, content digest) pairs, and the instance count."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.sha256)
        .where(Instance.series_pk == series_pk)
        .order_by(Instance.sop_instance_uid)
    ).all()
    h = hashlib.sha256()
    for uid, digest in rows:
        h.update(f"{uid}={digest}\n".encode())
    return h.hexdigest(), len(rows)


def quiet_seconds(config: NodeConfig, calling_aet: str | None) -> float:
    """The quiet period for series sent by ``calling_aet``."""
    per = config.pairing.per_aet_quiet_seconds
    if calling_aet and calling_aet in per:
        return float(per[calling_aet])
    return float(config.pairing.series_quiet_seconds)


@dataclass
class ScanResult:
    """What one scan did (for logs and tests)."""

    completed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


def complete_quiet_series(session: Session, config: NodeConfig, now: datetime) -> ScanResult:
    """Mark series that have been quiet long enough complete; raise revisions on changes."""
    result = ScanResult()
    rows = session.execute(
        select(Series, SeriesProgress)
        .outerjoin(SeriesProgress, SeriesProgress.series_uid == Series.series_instance_uid)
        .where(
            or_(
                SeriesProgress.series_uid.is_(None),
                SeriesProgress.last_received_at.is_(None),
                SeriesProgress.last_received_at != Series.last_received_at,
            )
        )
    ).all()
    for series, progress in rows:
        quiet = quiet_seconds(config, series.calling_aet)
        if series.last_received_at > now - timedelta(seconds=quiet):
            continue
        digest, count = fingerprint(session, series.id)
        if progress is None:
            progress = SeriesProgress(series_uid=series.series_instance_uid, revision=0)
            session.add(progress)
        progress.last_received_at = series.last_received_at
        if progress.revision >= 1 and progress.fingerprint == digest:
            result.unchanged.append(series.series_instance_uid)
            series.state = SeriesState.COMPLETE
            continue
        progress.revision = int(progress.revision or 0) + 1
        progress.fingerprint = digest
        progress.instance_count = count
        progress.completed_at = now
        series.state = SeriesState.COMPLETE
        series.completed_at = now
        result.completed.append(series.series_instance_uid)
        log.info(
            "series %s complete (%s, %d instances, revision %d, quiet %.1fs)",
            series.series_instance_uid,
            series.modality,
            count,
            progress.revision,
            quiet,
        )
    session.flush()
    return result
