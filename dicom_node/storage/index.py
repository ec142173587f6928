"""The index rows of received instances: look-ups and inserts on the C-STORE path, and reads.

Statements on the C-STORE path are built once (building them costs more than running them)
and run through the session's connection; the first instance of a series creates its patient,
study and series rows through the ORM. Mixing patients is refused here: a study already
indexed under another patient, or a series under another study, raises
:class:`~dicom_node.errors.ConflictingInstanceError`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConflictingInstanceError
from dicom_node.models import Instance, Patient, Series, Study
from dicom_node.states import SeriesState
from dicom_node.storage.header import Header, safe_uid

log = logging.getLogger(__name__)

_SELECT_INSTANCE = select(
    Instance.sha256, Instance.transfer_syntax_uid, Instance.path, Instance.size
).where(Instance.sop_instance_uid == bindparam("uid"))
_SELECT_SERIES = (
    select(Series.id, Study.study_instance_uid, Patient.patient_id, Patient.issuer_of_patient_id)
    .join(Study, Series.study_pk == Study.id)
    .join(Patient, Study.patient_pk == Patient.id)
    .where(Series.series_instance_uid == bindparam("uid"))
)
_INSERT_INSTANCE = insert(Instance)
_COUNT_INSTANCE = (
    update(Series)
    .where(Series.id == bindparam("pk"))
    .values(number_of_instances=Series.number_of_instances + 1, last_received_at=bindparam("now"))
)


def existing_instance(session: Session, sop_instance_uid: str) -> Any:
    """(sha256, transfer_syntax_uid, path, size) of an indexed instance, or None."""
    return session.connection().execute(_SELECT_INSTANCE, {"uid": sop_instance_uid}).first()


def series_pk_for(session: Session, header: Header, calling_aet: str, now: datetime) -> int:
    """Primary key of the header's series, creating patient/study/series rows when new."""
    pk = _known_series(session, header)
    if pk is None:
        pk = _new_series(session, header, calling_aet, now).id
    return pk


def insert_instance(
    session: Session,
    header: Header,
    *,
    series_pk: int,
    rel_path: Path,
    size: int,
    digest: str,
    calling_aet: str,
    now: datetime,
) -> None:
    """Insert the instance row and count it in its series (the caller commits)."""
    inst = header.instance
    conn = session.connection()
    conn.execute(
        _INSERT_INSTANCE,
        {
            "sop_instance_uid": header.sop_instance_uid,
            "series_pk": series_pk,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "path": rel_path.as_posix(),
            "size": size,
            "sha256": digest,
            "instance_number": inst.instance_number,
            "image_position_patient": inst.image_position_patient,
            "slice_position": inst.slice_position,
            "number_of_frames": inst.number_of_frames,
            "received_at": now,
            "calling_aet": calling_aet,
        },
    )
    conn.execute(_COUNT_INSTANCE, {"pk": series_pk, "now": now})


def remove_instance(session: Session, sop_instance_uid: str) -> None:
    """Delete an instance row and uncount it (the caller commits)."""
    inst = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
    if inst is not None:
        inst.series.number_of_instances -= 1
        session.delete(inst)


def _known_series(session: Session, header: Header) -> int | None:
    """Primary key of the header's series if indexed (None if new); refuse mixing."""
    row = session.connection().execute(_SELECT_SERIES, {"uid": header.series_uid}).first()
    if row is None:
        return None
    if row.study_instance_uid != header.study_uid:
        raise _conflict(header, "series", header.series_uid, "study")
    if (row.patient_id, row.issuer_of_patient_id) != (
        header.patient.patient_id,
        header.patient.issuer,
    ):
        raise _conflict(header, "study", header.study_uid, "patient")
    return int(row.id)


def _patient(session: Session, header: Header) -> Patient:
    p = header.patient
    patient = session.scalar(
        select(Patient).where(
            Patient.patient_id == p.patient_id, Patient.issuer_of_patient_id == p.issuer
        )
    )
    if patient is None:
        patient = Patient(
            patient_id=p.patient_id,
            issuer_of_patient_id=p.issuer,
            patient_name=p.name,
            birth_date=p.birth_date,
            sex=p.sex,
        )
        session.add(patient)
    return patient


def _study(session: Session, header: Header, patient: Patient) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == header.study_uid))
    if study is None:
        s = header.study
        study = Study(
            study_instance_uid=header.study_uid,
            patient=patient,
            study_date=s.date,
            study_time=s.time,
            study_description=s.description,
            accession_number=s.accession_number,
        )
        session.add(study)
    elif study.patient is not patient:
        raise _conflict(header, "study", header.study_uid, "patient")
    return study


def _new_series(session: Session, header: Header, calling_aet: str, now: datetime) -> Series:
    """Find or create patient, study and series rows; refuse cross-patient mixing."""
    study = _study(session, header, _patient(session, header))
    series = session.scalar(select(Series).where(Series.series_instance_uid == header.series_uid))
    if series is not None:
        if series.study is not study:
            raise _conflict(header, "series", header.series_uid, "study")
        return series
    s = header.series
    series = Series(
        series_instance_uid=header.series_uid,
        study=study,
        modality=s.modality,
        series_description=s.description,
        series_number=s.number,
        series_date=s.date,
        series_time=s.time,
        frame_of_reference_uid=s.frame_of_reference_uid,
        image_orientation_patient=s.image_orientation_patient,
        sop_class_uid=header.sop_class_uid,
        image_type=s.image_type,
        number_of_instances=0,
        first_received_at=now,
        last_received_at=now,
        calling_aet=calling_aet,
        state=SeriesState.RECEIVING,
    )
    session.add(series)
    session.flush()  # assigns series.id
    return series


def _conflict(header: Header, kind: str, uid: str, owner: str) -> ConflictingInstanceError:
    """Log and build the refusal of an instance whose series or study belongs elsewhere."""
    log.warning(
        "refused instance %s: %s %s is indexed under another %s",
        header.sop_instance_uid,
        kind,
        uid,
        owner,
    )
    return ConflictingInstanceError(f"{kind} {uid} already belongs to a different {owner}")


def series_paths(sessions: sessionmaker[Session], root: Path, series_uid: str) -> list[Path]:
    """Absolute paths of a series' stored files, in slice (then instance number) order."""
    uid = safe_uid(series_uid)
    with sessions() as session:
        rows = session.execute(
            select(Instance.path, Instance.slice_position, Instance.instance_number)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == uid)
        ).all()
    ordered = sorted(
        rows,
        key=lambda r: (
            r.slice_position is None,
            r.slice_position or 0.0,
            r.instance_number or 0,
            r.path,
        ),
    )
    return [root / r.path for r in ordered]
