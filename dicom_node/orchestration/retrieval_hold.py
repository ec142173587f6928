"""Which series pairing must not use yet because their retrieval from the PACS is incomplete.

A series the node retrieved (:mod:`.prefetch`) is held while its latest retrieval is still
running, ended partial or failed, or ended complete but fewer instances are stored now than
the PACS reported. A held series is never paired, so a partly retrieved MR is never fused as
if it were complete; the next complete retrieval of it lifts the hold. Series that were never
retrieved (received by C-STORE) are never held.

This module reads only the index, so :mod:`.pairing` can use it without importing the
network side of prefetch.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.models import Instance, Retrieval, Series
from dicom_node.states import RetrievalState


def stored_count(session: Session, series_uid: str) -> int:
    """Instances of a series stored in the index now."""
    return int(
        session.scalar(
            select(func.count(Instance.id))
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
        )
        or 0
    )


def latest_retrievals(session: Session, series_uids: Iterable[str]) -> dict[str, Retrieval]:
    """The newest retrieval row of each of ``series_uids`` that was ever retrieved."""
    uids = sorted(set(series_uids))
    if not uids:
        return {}
    newest = (
        select(func.max(Retrieval.id))
        .where(Retrieval.series_uid.in_(uids))
        .group_by(Retrieval.series_uid)
        .scalar_subquery()
    )
    rows = session.scalars(select(Retrieval).where(Retrieval.id.in_(newest))).all()
    return {r.series_uid: r for r in rows}


def hold_reason(session: Session, retrieval: Retrieval) -> str | None:
    """Why the series of ``retrieval`` (its newest one) is held, or None when it is usable."""
    if retrieval.state != RetrievalState.COMPLETE:
        return (
            f"retrieval from the PACS {retrieval.state} ({retrieval.completed} of "
            f"{retrieval.expected or '?'} instances, {retrieval.failed} failed, "
            f"{retrieval.warning} warning)"
        )
    stored = stored_count(session, retrieval.series_uid)
    if stored < retrieval.expected:
        return f"only {stored} of the {retrieval.expected} retrieved instances are stored"
    return None


def held_series(session: Session, series_uids: Iterable[str]) -> dict[str, str]:
    """The held series among ``series_uids``, each with the reason in words."""
    held: dict[str, str] = {}
    for uid, retrieval in latest_retrievals(session, series_uids).items():
        reason = hold_reason(session, retrieval)
        if reason is not None:
            held[uid] = reason
    return held
