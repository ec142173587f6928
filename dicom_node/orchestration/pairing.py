"""CT-MR pairing, with every decision and its reason recorded.

Completed series (:mod:`.completion`) are paired: for a complete axial CT (at least
``pairing.min_slices`` images, no localizer or scout, not a derived series), choose among the
complete MR series of the same PatientID and IssuerOfPatientID (both must be equal; a missing
issuer equals only a missing issuer) acquired within ``pairing.max_days_between`` days the one
with the highest rule weight (``pairing.mr_rules``: SeriesDescription regexes), then the closest
in time, then the one with more images. An MR whose retrieval from the PACS is incomplete is
held (:mod:`.retrieval_hold`). Without a usable MR the CT waits ("waiting") until
``max_days_between`` days after it was completed; then the decision becomes "expired". A new or
changed MR re-runs the pairing of its patient's waiting CTs and of the CTs paired with it.

The rules are plain functions over :class:`SeriesInfo` (tests call them directly); the scan and
the database bookkeeping are in :func:`scan`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.models import (
    Instance,
    Job,
    PairingDecision,
    Patient,
    Series,
    SeriesProgress,
    Study,
    utcnow,
)
from dicom_node.orchestration.completion import ScanResult, complete_quiet_series
from dicom_node.orchestration.jobs import create_job
from dicom_node.orchestration.retrieval_hold import held_series
from dicom_node.states import PairingOutcome

log = logging.getLogger(__name__)

MIN_MR_SLICES = 3
AXIAL_MIN_COSINE = 0.9  # |normal . z| for a CT to count as axial (about 25 degrees of tilt)
_LOCALIZER_WORDS = re.compile(r"scout|topogram|localizer|localiser|surview|scanogram|pilot", re.I)


@dataclass(frozen=True)
class SeriesInfo:
    """What the pairing rules need to know about one series (built from index rows)."""

    series_uid: str
    study_uid: str
    patient_id: str
    issuer: str
    modality: str
    description: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    num_instances: int
    acquired_at: datetime | None
    completed_at: datetime | None = None
    revision: int = 0


@dataclass
class Choice:
    """The outcome of :func:`choose_mr`: the chosen MR (or None) and the reason in words."""

    mr: SeriesInfo | None
    reason: str
    rejected: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing helpers
def parse_dicom_datetime(date: str | None, time: str | None) -> datetime | None:
    """DA (+ optional TM) -> naive datetime; None when the date is missing or invalid."""
    if not date:
        return None
    d = date.strip().replace(".", "")
    try:
        day = datetime.strptime(d[:8], "%Y%m%d")
    except ValueError:
        return None
    t = (time or "").strip().replace(":", "")
    if not t:
        return day
    hh = int(t[0:2]) if t[0:2].isdigit() else 0
    mm = int(t[2:4]) if t[2:4].isdigit() else 0
    ss = int(t[4:6]) if t[4:6].isdigit() else 0
    try:
        return day.replace(hour=min(hh, 23), minute=min(mm, 59), second=min(ss, 59))
    except ValueError:
        return day


def parse_multi(value: str | None) -> tuple[str, ...]:
    """A multi-valued string as the index keeps it ('A\\B', '["A", "B"]', 'A,B') -> parts."""
    if not value:
        return ()
    cleaned = re.sub(r"[\[\]'\"]", "", value)
    return tuple(p.strip() for p in re.split(r"[\\,]", cleaned) if p.strip())


def parse_orientation(value: str | None) -> tuple[float, ...] | None:
    """ImageOrientationPatient text -> six floats, or None."""
    parts = parse_multi(value)
    if len(parts) != 6:
        parts = tuple(p for p in re.split(r"[\s\\,\[\]]+", value or "") if p)
    try:
        floats = tuple(float(p) for p in parts)
    except ValueError:
        return None
    return floats if len(floats) == 6 else None


def slice_normal_z(orientation: tuple[float, ...]) -> float:
    """|z component| of the unit slice normal of an ImageOrientationPatient."""
    r = orientation[:3]
    c = orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    return abs(n[2]) / norm if norm > 0 else 0.0


# --------------------------------------------------------------------------- rules
def _common_exclusions(s: SeriesInfo) -> str | None:
    types = {t.upper() for t in s.image_type}
    if "LOCALIZER" in types or "SCOUT" in types or _LOCALIZER_WORDS.search(s.description):
        return "localizer/scout"
    if "DERIVED" in types:
        return "derived series (ImageType DERIVED), e.g. our own output coming back"
    return None


def ct_eligibility(ct: SeriesInfo, min_slices: int) -> str | None:
    """Why a CT series cannot be paired, or None when it is a usable axial CT volume."""
    if ct.modality != "CT":
        return f"modality {ct.modality or '?'} is not CT"
    excluded = _common_exclusions(ct)
    if excluded:
        return excluded
    if ct.num_instances < min_slices:
        return f"{ct.num_instances} images < pairing.min_slices {min_slices}"
    if ct.orientation is None:
        return "no ImageOrientationPatient"
    if slice_normal_z(ct.orientation) < AXIAL_MIN_COSINE:
        return "not axial"
    return None


def mr_eligibility(mr: SeriesInfo, min_slices: int = MIN_MR_SLICES) -> str | None:
    """Why an MR series cannot serve as the MR of a pair, or None when it can."""
    if mr.modality != "MR":
        return f"modality {mr.modality or '?'} is not MR"
    excluded = _common_exclusions(mr)
    if excluded:
        return excluded
    if mr.num_instances < min_slices:
        return f"{mr.num_instances} images: not a volume"
    return None


def same_patient(a: SeriesInfo, b: SeriesInfo) -> bool:
    """Same PatientID and the same IssuerOfPatientID ('' only equals '')."""
    return bool(a.patient_id) and a.patient_id == b.patient_id and a.issuer == b.issuer


def rule_weight(description: str, rules: list[tuple[str, float]]) -> tuple[float, list[str]]:
    """Sum of the weights of the rules whose regex matches ``description``, and those rules."""
    total = 0.0
    matched: list[str] = []
    for pattern, weight in rules:
        if re.search(pattern, description or ""):
            total += weight
            matched.append(pattern)
    return total, matched


def _days(delta: timedelta) -> float:
    return abs(delta.total_seconds()) / 86400.0


def _describe(s: SeriesInfo) -> str:
    return f"{s.modality} series {s.series_uid} ('{s.description}', {s.num_instances} images)"


def choose_mr(
    ct: SeriesInfo,
    candidates: list[SeriesInfo],
    *,
    max_days: float,
    rules: list[tuple[str, float]],
) -> Choice:
    """Choose the MR for ``ct`` among ``candidates``, with the reason (no patient identifiers)."""
    rejected: list[str] = []
    usable: list[tuple[float, float, int, str, SeriesInfo, list[str]]] = []
    if ct.acquired_at is None:
        return Choice(None, "CT has no acquisition/series/study date: cannot apply the time window")
    for mr in candidates:
        if not same_patient(ct, mr):
            continue
        why = mr_eligibility(mr)
        days = -1.0
        if why is None:
            if mr.acquired_at is None:
                why = "no date"
            else:
                days = _days(mr.acquired_at - ct.acquired_at)
                if days > max_days:
                    why = f"{days:.1f} days from the CT > pairing.max_days_between {max_days:g}"
        if why is not None:
            rejected.append(f"{mr.series_uid}: {why}")
            continue
        weight, matched = rule_weight(mr.description, rules)
        usable.append((-weight, days, -mr.num_instances, mr.series_uid, mr, matched))
    if not usable:
        reason = "no usable MR of this patient yet"
        if rejected:
            reason += f" (rejected: {'; '.join(rejected)})"
        return Choice(None, reason, rejected)
    usable.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
    neg_w, days, _, _, best, matched = usable[0]
    earlier = best.acquired_at is not None and best.acquired_at < ct.acquired_at
    when = "before" if earlier else "after"
    parts = [f"chose {_describe(best)}, acquired {days:.1f} days {when} the CT"]
    if matched:
        parts.append(f"matches rule(s) {', '.join(repr(m) for m in matched)} (weight {-neg_w:g})")
    elif rules:
        parts.append("matches no MR rule")
    if len(usable) > 1:
        others = ", ".join(
            f"{u[4].series_uid} (weight {-u[0]:g}, {u[1]:.1f} d)" for u in usable[1:]
        )
        parts.append(f"preferred over {others} by rule weight, then closeness in time")
    if rejected:
        parts.append(f"rejected: {'; '.join(rejected)}")
    return Choice(best, "; ".join(parts), rejected)


# --------------------------------------------------------------------------- index access
def _frames_column() -> Any:
    """Images of a series: instances, counting every frame of multi-frame (Enhanced) ones."""
    return (
        select(func.coalesce(func.sum(func.coalesce(Instance.number_of_frames, 1)), 0))
        .where(Instance.series_pk == Series.id)
        .correlate(Series)
        .scalar_subquery()
    )


def _info(
    series: Series, study: Study, patient: Patient, revision: int, frames: int | None = None
) -> SeriesInfo:
    acquired = parse_dicom_datetime(series.series_date, series.series_time) or parse_dicom_datetime(
        study.study_date, study.study_time
    )
    return SeriesInfo(
        series_uid=series.series_instance_uid,
        study_uid=study.study_instance_uid,
        patient_id=patient.patient_id or "",
        issuer=patient.issuer_of_patient_id or "",
        modality=(series.modality or "").upper(),
        description=series.series_description or "",
        image_type=parse_multi(series.image_type),
        orientation=parse_orientation(series.image_orientation_patient),
        num_instances=int(frames if frames is not None else series.number_of_instances or 0),
        acquired_at=acquired,
        completed_at=series.completed_at,
        revision=revision,
    )


def series_info(session: Session, series_uid: str) -> SeriesInfo | None:
    """The :class:`SeriesInfo` of one indexed series (revision from its progress row)."""
    row = session.execute(
        select(Series, Study, Patient, SeriesProgress.revision, _frames_column())
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .outerjoin(SeriesProgress, SeriesProgress.series_uid == Series.series_instance_uid)
        .where(Series.series_instance_uid == series_uid)
    ).first()
    if row is None:
        return None
    return _info(row[0], row[1], row[2], int(row[3] or 0), int(row[4] or 0))


def _complete_series_of_patient(
    session: Session, patient_id: str, issuer: str, modality: str
) -> list[SeriesInfo]:
    rows = session.execute(
        select(Series, Study, Patient, SeriesProgress.revision, _frames_column())
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .join(SeriesProgress, SeriesProgress.series_uid == Series.series_instance_uid)
        .where(
            Patient.patient_id == patient_id,
            Patient.issuer_of_patient_id == issuer,
            Series.modality == modality,
            SeriesProgress.revision >= 1,
        )
        .order_by(Series.id)
    ).all()
    return [_info(r[0], r[1], r[2], int(r[3] or 0), int(r[4] or 0)) for r in rows]


def _latest_decision(session: Session, ct_uid: str) -> PairingDecision | None:
    return session.scalars(
        select(PairingDecision)
        .where(PairingDecision.ct_series_uid == ct_uid)
        .order_by(PairingDecision.id.desc())
        .limit(1)
    ).first()


def _rules(config: NodeConfig) -> list[tuple[str, float]]:
    return [(r.series_description_regex, float(r.weight)) for r in config.pairing.mr_rules]


def _mr_candidates(session: Session, ct: SeriesInfo) -> tuple[list[SeriesInfo], dict[str, str]]:
    """The CT patient's complete MR series, less those held because their retrieval from the
    PACS is incomplete (returned apart, with the reason): a partial MR is never paired."""
    candidates = _complete_series_of_patient(session, ct.patient_id, ct.issuer, "MR")
    held = held_series(session, (c.series_uid for c in candidates))
    return [c for c in candidates if c.series_uid not in held], held


def pair_ct(session: Session, config: NodeConfig, ct: SeriesInfo, now: datetime) -> PairingDecision:
    """Decide the pairing of one complete CT revision; creates the job when an MR is chosen.

    Idempotent: the same CT revision with the same MR revision never gets a second job, and
    an unchanged "waiting" decision is not recorded twice.
    """
    latest = _latest_decision(session, ct.series_uid)
    why_not = ct_eligibility(ct, config.pairing.min_slices)
    if why_not is not None:
        if (
            latest is not None
            and latest.outcome == PairingOutcome.IGNORED
            and latest.ct_revision == ct.revision
        ):
            return latest
        return _record(
            session, ct, None, PairingOutcome.IGNORED, f"CT not paired: {why_not}", now, None
        )
    candidates, held = _mr_candidates(session, ct)
    choice = choose_mr(
        ct, candidates, max_days=float(config.pairing.max_days_between), rules=_rules(config)
    )
    if choice.mr is None and held:
        choice.reason += "; held until retrieved complete: " + "; ".join(
            f"{uid}: {why}" for uid, why in held.items()
        )
    if choice.mr is None:
        closes = (ct.completed_at or now) + timedelta(days=config.pairing.max_days_between)
        if closes <= now:
            return _record(
                session,
                ct,
                None,
                PairingOutcome.EXPIRED,
                f"window closed: {choice.reason}",
                now,
                None,
            )
        if (
            latest is not None
            and latest.outcome == PairingOutcome.WAITING
            and latest.ct_revision == ct.revision
            and latest.reason == choice.reason
        ):
            return latest
        return _record(session, ct, None, PairingOutcome.WAITING, choice.reason, now, closes)
    mr = choice.mr
    existing = session.scalars(
        select(Job).where(
            Job.ct_series_uid == ct.series_uid,
            Job.ct_revision == ct.revision,
            Job.mr_series_uid == mr.series_uid,
            Job.mr_revision == mr.revision,
        )
    ).first()
    if existing is not None:
        if latest is not None and latest.job_id == existing.id:
            return latest
        return _record(
            session, ct, mr, PairingOutcome.PAIRED, choice.reason, now, None, existing.id
        )
    job = create_job(
        session,
        patient_id=ct.patient_id,
        issuer_of_patient_id=ct.issuer,
        ct_series_uid=ct.series_uid,
        mr_series_uid=mr.series_uid,
        ct_revision=ct.revision,
        mr_revision=mr.revision,
        pairing_reason=choice.reason,
    )
    log.info("job %d queued: CT %s + MR %s", job.id, ct.series_uid, mr.series_uid)
    log.debug("job %d patient %s", job.id, ct.patient_id)
    return _record(session, ct, mr, PairingOutcome.PAIRED, choice.reason, now, None, job.id)


def _record(
    session: Session,
    ct: SeriesInfo,
    mr: SeriesInfo | None,
    outcome: PairingOutcome,
    reason: str,
    now: datetime,
    closes: datetime | None,
    job_id: int | None = None,
) -> PairingDecision:
    decision = PairingDecision(
        ct_series_uid=ct.series_uid,
        ct_revision=ct.revision,
        mr_series_uid=mr.series_uid if mr else None,
        patient_id=ct.patient_id,
        outcome=outcome,
        reason=reason,
        decided_at=now,
        window_closes_at=closes,
        job_id=job_id,
    )
    session.add(decision)
    session.flush()
    log.info("pairing of CT %s: %s: %s", ct.series_uid, outcome, reason)
    return decision


def _cts_to_revisit(session: Session, mr: SeriesInfo) -> list[str]:
    """CT series of the MR's patient that wait for an MR or were paired with this MR."""
    cts = _complete_series_of_patient(session, mr.patient_id, mr.issuer, "CT")
    out: list[str] = []
    for ct in cts:
        latest = _latest_decision(session, ct.series_uid)
        if latest is None:
            continue
        if latest.outcome == PairingOutcome.WAITING or (
            latest.outcome == PairingOutcome.PAIRED and latest.mr_series_uid == mr.series_uid
        ):
            out.append(ct.series_uid)
    return out


def scan(
    sessions: sessionmaker[Session], config: NodeConfig, now: datetime | None = None
) -> ScanResult:
    """One scheduler tick: complete quiet series, pair new CTs, re-pair on new MRs, expire."""
    now = now or utcnow()
    with sessions() as session:
        result = complete_quiet_series(session, config, now)
        to_pair: list[str] = []
        for uid in result.completed:
            info = series_info(session, uid)
            if info is None:
                continue
            if info.modality == "CT":
                to_pair.append(uid)
            elif info.modality == "MR" and mr_eligibility(info) is None:
                to_pair.extend(u for u in _cts_to_revisit(session, info) if u not in to_pair)
        for uid in to_pair:
            info = series_info(session, uid)
            if info is None:
                continue
            decision = pair_ct(session, config, info, now)
            if decision.outcome == PairingOutcome.PAIRED and decision.job_id is not None:
                if decision.job_id not in result.jobs:
                    result.jobs.append(decision.job_id)
            elif decision.outcome == PairingOutcome.WAITING:
                result.waiting.append(uid)
        result.expired = expire_waiting(session, now)
        session.commit()
    return result


def expire_waiting(session: Session, now: datetime) -> list[str]:
    """Close the wait of CTs whose window has passed (the caller commits)."""
    expired: list[str] = []
    waiting = session.scalars(
        select(PairingDecision).where(
            PairingDecision.outcome == PairingOutcome.WAITING,
            PairingDecision.window_closes_at.is_not(None),
            PairingDecision.window_closes_at <= now,
        )
    ).all()
    for d in waiting:
        latest = _latest_decision(session, d.ct_series_uid)
        if latest is None or latest.id != d.id:
            continue
        session.add(
            PairingDecision(
                ct_series_uid=d.ct_series_uid,
                ct_revision=d.ct_revision,
                mr_series_uid=None,
                patient_id=d.patient_id,
                outcome=PairingOutcome.EXPIRED,
                reason=f"window closed without a usable MR ({d.reason})",
                decided_at=now,
            )
        )
        expired.append(d.ct_series_uid)
    return expired


def waiting_cts(session: Session) -> list[PairingDecision]:
    """Latest decisions that are still "waiting" (for ``dicom-node jobs``)."""
    decisions = session.scalars(
        select(PairingDecision)
        .where(PairingDecision.outcome == PairingOutcome.WAITING)
        .order_by(PairingDecision.id)
    ).all()
    out = []
    for d in decisions:
        latest = _latest_decision(session, d.ct_series_uid)
        if latest is not None and latest.id == d.id:
            out.append(d)
    return out


def latest_decision(session: Session, ct_uid: str) -> PairingDecision | None:
    """The newest pairing decision of a CT series (None before its first): prefetch asks
    whether the CT still waits before it queries the PACS."""
    return _latest_decision(session, ct_uid)


def mr_rules(config: NodeConfig) -> list[tuple[str, float]]:
    """``pairing.mr_rules`` as the (regex, weight) pairs :func:`choose_mr` takes."""
    return _rules(config)


def complete_series_of_patient(
    session: Session, patient_id: str, issuer: str, modality: str
) -> list[SeriesInfo]:
    """The complete series of one modality of a patient (PatientID within issuer)."""
    return _complete_series_of_patient(session, patient_id, issuer, modality)
