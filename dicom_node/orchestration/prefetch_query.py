"""Prefetch, the query side: find a CT patient's MR series in the PACS and rank them.

:func:`query_pacs` asks the PACS with Study Root C-FIND (study level: PatientID,
IssuerOfPatientID, ModalitiesInStudy MR, StudyDate within the pairing window; then series level:
the MR series of each study, and the image level for ImageType/Manufacturer where the series
level returned neither). :func:`rank` applies pairing's own rules to what it found, after
leaving out the node's own derived series and series already stored whole. No state is
changed here; :mod:`.prefetch` records and retrieves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.config import Destination, NodeConfig
from dicom_node.errors import InvalidUIDError, UsageError
from dicom_node.imaging.identity import MANUFACTURER
from dicom_node.models import Patient, Retrieval
from dicom_node.net import qr
from dicom_node.orchestration import pairing
from dicom_node.orchestration.retrieval_hold import hold_reason, latest_retrievals, stored_count
from dicom_node.storage.header import safe_uid

GENERIC_UID_ROOT = "2.25"
"""UUID-derived UIDs: everyone's, so a UID under it says nothing about who made the series."""
DATE_FORMAT = "%Y%m%d"

STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "PatientID", "IssuerOfPatientID")
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "ImageType",
    "Manufacturer",
)
IMAGE_KEYS = ("SOPInstanceUID", "ImageType", "Manufacturer")


@dataclass(frozen=True)
class Candidate:
    """An MR series the PACS holds: what pairing's rules need, and its reported size."""

    info: pairing.SeriesInfo
    expected: int
    """NumberOfSeriesRelatedInstances (0: not reported)."""
    manufacturer: str


@dataclass
class QueryOutcome:
    """What the PACS answered: studies matched, studies left out (with why), MR series."""

    window: str
    studies: int = 0
    skipped: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)


# --------------------------------------------------------------------------- query
def _window(ct: pairing.SeriesInfo, max_days: float) -> str:
    assert ct.acquired_at is not None
    span = timedelta(days=max_days)
    return f"{(ct.acquired_at - span):{DATE_FORMAT}}-{(ct.acquired_at + span):{DATE_FORMAT}}"


def _study_mismatch(study: dict[str, str], ct: pairing.SeriesInfo) -> str | None:
    """Why a matched study is not the CT's patient (pairing's same-patient rule), or None."""
    if study["PatientID"] != ct.patient_id:
        return "PatientID differs from the CT's (the PACS matched loosely)"
    if study["IssuerOfPatientID"] != ct.issuer:
        return "IssuerOfPatientID differs from the CT's: another patient's record"
    try:
        safe_uid(study["StudyInstanceUID"])
    except InvalidUIDError as exc:
        return f"unusable StudyInstanceUID ({exc})"
    return None


def _candidate(study: dict[str, str], series: dict[str, str]) -> Candidate:
    """A series-level match as pairing's :class:`~.pairing.SeriesInfo`."""
    count = series["NumberOfSeriesRelatedInstances"]
    expected = int(count) if count.isdigit() else 0
    acquired = pairing.parse_dicom_datetime(
        series["SeriesDate"], series["SeriesTime"]
    ) or pairing.parse_dicom_datetime(study["StudyDate"], study["StudyTime"])
    info = pairing.SeriesInfo(
        series_uid=safe_uid(series["SeriesInstanceUID"]),
        study_uid=study["StudyInstanceUID"],
        patient_id=study["PatientID"],
        issuer=study["IssuerOfPatientID"],
        modality=series["Modality"].upper(),
        description=series["SeriesDescription"],
        image_type=pairing.parse_multi(series["ImageType"]),
        orientation=None,
        num_instances=expected or pairing.MIN_MR_SLICES,
        acquired_at=acquired,
    )
    return Candidate(info, expected, series["Manufacturer"])


def _image_level(qa: qr.QueryAssociation, cand: Candidate) -> Candidate:
    """ImageType and Manufacturer from the instances when the series level gave neither."""
    keys = {k: "" for k in IMAGE_KEYS}
    keys |= {"StudyInstanceUID": cand.info.study_uid, "SeriesInstanceUID": cand.info.series_uid}
    types: list[str] = []
    manufacturer = ""
    for match in qa.find("IMAGE", keys):
        types.extend(t for t in pairing.parse_multi(match["ImageType"]) if t not in types)
        manufacturer = manufacturer or match["Manufacturer"]
    info = replace(cand.info, image_type=tuple(types))
    return Candidate(info, cand.expected, manufacturer)


def query_pacs(
    peer: Destination, options: qr.QROptions, ct: pairing.SeriesInfo, max_days: float
) -> QueryOutcome:
    """C-FIND the CT patient's MR studies in the window, then their MR series."""
    found = QueryOutcome(window=_window(ct, max_days))
    study_keys = {k: "" for k in STUDY_KEYS} | {
        "PatientID": ct.patient_id,
        "IssuerOfPatientID": ct.issuer,
        "ModalitiesInStudy": "MR",
        "StudyDate": found.window,
    }
    with qr.QueryAssociation(peer, options) as qa:
        studies = qa.find("STUDY", study_keys)
        found.studies = len(studies)
        for study in studies:
            why = _study_mismatch(study, ct)
            if why is not None:
                found.skipped.append(f"study {study['StudyInstanceUID'][:64]}: {why}")
                continue
            keys = {k: "" for k in SERIES_KEYS}
            keys |= {"StudyInstanceUID": study["StudyInstanceUID"], "Modality": "MR"}
            for series in qa.find("SERIES", keys):
                try:
                    cand = _candidate(study, series)
                except InvalidUIDError as exc:
                    found.skipped.append(f"a series of study {study['StudyInstanceUID']}: {exc}")
                    continue
                if not series["ImageType"] and not series["Manufacturer"]:
                    cand = _image_level(qa, cand)
                found.candidates.append(cand)
    return found


# --------------------------------------------------------------------------- ranking
def _own_series(cand: Candidate, config: NodeConfig) -> str | None:
    """Why a series is the node's own derived output, or None."""
    if cand.manufacturer == MANUFACTURER:
        return f"the node's own derived series (Manufacturer {MANUFACTURER})"
    root = config.derive.uid_root
    if root != GENERIC_UID_ROOT and cand.info.series_uid.startswith(root + "."):
        return f"the node's own derived series (UID under derive.uid_root {root})"
    return None


def _already_stored(session: Session, cand: Candidate, retrieval: Retrieval | None) -> str | None:
    """Why retrieving is pointless (stored whole), or None when it is missing or incomplete."""
    stored = stored_count(session, cand.info.series_uid)
    if stored == 0 or stored < cand.expected:
        return None
    if retrieval is not None and hold_reason(session, retrieval) is not None:
        return None  # an earlier retrieval of it was partial: fetch it again
    return f"already stored ({stored} instances)"


def describe(cand: Candidate) -> str:
    """The series in words for records (no patient identifiers)."""
    info = cand.info
    when = f"{info.acquired_at:%Y-%m-%d}" if info.acquired_at else "no date"
    size = f"{cand.expected} images" if cand.expected else "image count not reported"
    return f"MR series '{info.description}' ({size}, {when})"


def rank(
    session: Session, config: NodeConfig, ct: pairing.SeriesInfo, candidates: list[Candidate]
) -> tuple[list[tuple[Candidate, str]], dict[str, str]]:
    """The series to retrieve (best first, with pairing's reason) and why each other was not.

    Same rules as pairing: :func:`~.pairing.mr_eligibility`, then :func:`~.pairing.choose_mr`
    (time window, rule weight, closeness, size), taken up to ``prefetch.max_series`` times.
    """
    rejected: dict[str, str] = {}
    usable: dict[str, Candidate] = {}
    earlier = latest_retrievals(session, (c.info.series_uid for c in candidates))
    for cand in candidates:
        uid = cand.info.series_uid
        why = (
            _own_series(cand, config)
            or pairing.mr_eligibility(cand.info)
            or _already_stored(session, cand, earlier.get(uid))
        )
        if why is not None:
            rejected[uid] = why
        else:
            usable[uid] = cand
    chosen: list[tuple[Candidate, str]] = []
    remaining = [c.info for c in usable.values()]
    max_days = float(config.pairing.max_days_between)
    for _ in range(config.prefetch.max_series):
        choice = pairing.choose_mr(ct, remaining, max_days=max_days, rules=pairing.mr_rules(config))
        for item in choice.rejected:
            uid, _, why = item.partition(": ")
            rejected.setdefault(uid, why)
        if choice.mr is None:
            break
        chosen.append((usable[choice.mr.series_uid], choice.reason))
        remaining = [i for i in remaining if i.series_uid != choice.mr.series_uid]
    return chosen, rejected


# --------------------------------------------------------------------------- manual runs
def _patient_issuer(session: Session, patient_id: str, issuer: str | None) -> str:
    issuers = list(
        session.scalars(
            select(Patient.issuer_of_patient_id).where(Patient.patient_id == patient_id)
        ).all()
    )
    if issuer is not None:
        if issuer not in issuers:
            raise UsageError("no patient with this PatientID and issuer in the index")
        return issuer
    if not issuers:
        raise UsageError("no patient with this PatientID in the index")
    if len(issuers) > 1:
        raise UsageError(
            f"{len(issuers)} patients have this PatientID (different IssuerOfPatientID): "
            "give --issuer"
        )
    return issuers[0]


def reference_ct(
    session: Session, config: NodeConfig, patient_id: str, issuer: str | None
) -> pairing.SeriesInfo:
    """The patient's newest complete, eligible CT (what a manual prefetch pairs the MR with)."""
    issuer = _patient_issuer(session, patient_id, issuer)
    cts = [
        ct
        for ct in pairing.complete_series_of_patient(session, patient_id, issuer, "CT")
        if pairing.ct_eligibility(ct, config.pairing.min_slices) is None
        and ct.acquired_at is not None
    ]
    if not cts:
        raise UsageError(
            "no complete, eligible CT of this patient in the index: nothing to pair an MR with"
        )
    return max(cts, key=lambda c: (c.acquired_at or datetime.min, c.completed_at or datetime.min))


def audit_query(
    config: NodeConfig, peer: Destination, ct: pairing.SeriesInfo, *, ok: bool, text: str
) -> None:
    """Record a query of the PACS in the audit trail (ATNA Query; the patient hashed)."""
    audit.trail(config).query(
        calling_aet=config.node.ae_title,
        called_aet=peer.ae_title,
        peer=f"{peer.host}:{peer.port}",
        ok=ok,
        text=text,
        patient_id=ct.patient_id,
        issuer=ct.issuer,
    )
