"""What the index needs from a received instance, parsed from its bytes and validated.

Anything from the wire is checked here before it can become a path part or an index row: the
four UIDs must be valid DICOM UIDs (digits and single dots, at most 64 characters), the SOP
Instance and Class UIDs must agree with the request, and every text value is cut to its
column's width.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.errors import InvalidDatasetError, InvalidUIDError, SOPClassMismatchError

# Digits and single dots only: no empty component, so never '', '.', '..' or a separator.
# Leading zeros in a component are tolerated (invalid per PS3.5 but common and path-safe).
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LEN = 64
_PREAMBLE_AND_PREFIX = 132


def safe_uid(uid: object) -> str:
    """Return ``uid`` (stripped of padding) if it is a valid DICOM UID usable as a path part."""
    if not isinstance(uid, str):
        raise InvalidUIDError(f"UID must be a string, got {type(uid).__name__}")
    value = uid.strip(" \x00")
    if not value or len(value) > MAX_UID_LEN or not _UID_RE.match(value):
        raise InvalidUIDError(f"invalid UID {value[:80]!r}")
    return value


@dataclass(frozen=True)
class PatientFields:
    """Patient module values (PatientID '' and issuer '' when absent)."""

    patient_id: str
    issuer: str
    name: str | None
    birth_date: str | None
    sex: str | None


@dataclass(frozen=True)
class StudyFields:
    """General Study module values kept in the index."""

    date: str | None
    time: str | None
    description: str | None
    accession_number: str | None


@dataclass(frozen=True)
class SeriesFields:
    """General Series (and plane orientation) values pairing needs."""

    modality: str | None
    description: str | None
    number: int | None
    date: str | None
    time: str | None
    frame_of_reference_uid: str | None
    image_orientation_patient: str | None
    image_type: str | None


@dataclass(frozen=True)
class InstanceFields:
    """Per-instance values: where the slice lies, how many frames it has."""

    instance_number: int | None
    image_position_patient: str | None
    slice_position: float | None
    number_of_frames: int | None


@dataclass(frozen=True)
class Header:
    """The identity and indexed attributes of one received instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient: PatientFields
    study: StudyFields
    series: SeriesFields
    instance: InstanceFields


def dataset_offset(encoded: bytes) -> int:
    """Offset of the dataset in Part-10 bytes (after preamble, 'DICM' and the file meta)."""
    if len(encoded) < 144 or encoded[128:_PREAMBLE_AND_PREFIX] != b"DICM":
        raise InvalidDatasetError("not DICOM Part-10 bytes (no 'DICM' prefix)")
    tag_group, tag_elem = struct.unpack("<HH", encoded[132:136])
    if (tag_group, tag_elem) != (0x0002, 0x0000) or encoded[136:138] != b"UL":
        raise InvalidDatasetError("file meta has no group length element")
    (group_len,) = struct.unpack("<I", encoded[140:144])
    offset = 144 + int(group_len)
    if offset > len(encoded):
        raise InvalidDatasetError("file meta group length exceeds the data")
    return offset


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(str(value))
    except (TypeError, ValueError):
        return None


def _orientation(ds: Dataset) -> list[float] | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        try:  # enhanced multi-frame: shared functional groups
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 6 else None


def _slice_position(ds: Dataset, iop: list[float] | None) -> tuple[str | None, float | None]:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None:
        return None, None
    try:
        pos = [float(v) for v in ipp]
    except (TypeError, ValueError):
        return None, None
    if len(pos) != 3:
        return None, None
    text = "\\".join(f"{v:g}" for v in pos)
    if iop is None:
        return text, None
    r, c = iop[:3], iop[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return text, sum(p * n for p, n in zip(pos, normal, strict=True))


def _fields(ds: Dataset) -> tuple[PatientFields, StudyFields, SeriesFields, InstanceFields]:
    iop = _orientation(ds)
    ipp_text, slice_pos = _slice_position(ds, iop)
    patient = PatientFields(
        patient_id=_text(ds, "PatientID") or "",
        issuer=_text(ds, "IssuerOfPatientID") or "",
        name=_text(ds, "PatientName", 324),
        birth_date=_text(ds, "PatientBirthDate", 8),
        sex=_text(ds, "PatientSex", 16),
    )
    study = StudyFields(
        date=_text(ds, "StudyDate", 8),
        time=_text(ds, "StudyTime", 16),
        description=_text(ds, "StudyDescription"),
        accession_number=_text(ds, "AccessionNumber", 16),
    )
    series = SeriesFields(
        modality=_text(ds, "Modality", 16),
        description=_text(ds, "SeriesDescription"),
        number=_int(ds, "SeriesNumber"),
        date=_text(ds, "SeriesDate", 8),
        time=_text(ds, "SeriesTime", 16),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        image_orientation_patient="\\".join(f"{v:g}" for v in iop) if iop else None,
        image_type=_text(ds, "ImageType", 128),
    )
    instance = InstanceFields(
        instance_number=_int(ds, "InstanceNumber"),
        image_position_patient=ipp_text,
        slice_position=slice_pos,
        number_of_frames=_int(ds, "NumberOfFrames"),
    )
    return patient, study, series, instance


def _uid_field(ds: Dataset, keyword: str) -> str:
    raw = ds.get(keyword)
    if raw is None or str(raw).strip(" \x00") == "":
        raise InvalidDatasetError(f"dataset has no {keyword}")
    try:
        return safe_uid(str(raw))
    except InvalidUIDError as exc:
        raise InvalidUIDError(f"{exc} in dataset") from None


def parse_header(encoded: bytes) -> Header:
    """Parse the header of received Part-10 bytes (no pixel data); raise on anything unusable."""
    try:
        ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True)
        meta = ds.file_meta
        ts = str(meta.TransferSyntaxUID)
        patient, study, series, instance = _fields(ds)
        sop_uid = _uid_field(ds, "SOPInstanceUID")
        sop_class = _uid_field(ds, "SOPClassUID")
        study_uid = _uid_field(ds, "StudyInstanceUID")
        series_uid = _uid_field(ds, "SeriesInstanceUID")
    except (InvalidDatasetError, InvalidUIDError):
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    meta_uid = str(meta.get("MediaStorageSOPInstanceUID", "")).strip(" \x00")
    if meta_uid and meta_uid != sop_uid:
        raise InvalidDatasetError(
            f"SOPInstanceUID {sop_uid} differs from the request's affected instance {meta_uid}"
        )
    meta_class = str(meta.get("MediaStorageSOPClassUID", "")).strip(" \x00")
    if meta_class and meta_class != sop_class:
        raise SOPClassMismatchError(
            f"dataset SOPClassUID {sop_class} differs from the negotiated class {meta_class}"
        )
    return Header(sop_uid, sop_class, study_uid, series_uid, ts, patient, study, series, instance)
