"""Received headers: UIDs validated before they become paths, typed fields for the index."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import MRImageStorage

from dicom_node.errors import InvalidDatasetError, InvalidUIDError, SOPClassMismatchError
from dicom_node.storage.header import dataset_offset, parse_header, safe_uid


def _encoded(path: Path, **changes: object) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.123456789", "1.2.3.04", "1" * 64]
)
def test_safe_uid_accepts(uid: str) -> None:
    assert safe_uid(uid + "\x00") == uid


@pytest.mark.parametrize(
    "uid", ["", "..", "../x", "1.2..3", "1.2.3.", ".1.2", "1.2/3", "1.2.a", "1" * 65, " ", "1 2"]
)
def test_safe_uid_rejects(uid: str) -> None:
    with pytest.raises(InvalidUIDError):
        safe_uid(uid)


def test_header_fields_for_the_index(ct_files: list[Path]) -> None:
    ds = pydicom.dcmread(ct_files[3], stop_before_pixels=True)
    header = parse_header(ct_files[3].read_bytes())
    assert header.sop_instance_uid == str(ds.SOPInstanceUID)
    assert header.series_uid == str(ds.SeriesInstanceUID)
    assert header.patient.patient_id == str(ds.PatientID)
    assert header.series.modality == "CT"
    assert header.series.image_orientation_patient == "1\\0\\0\\0\\1\\0"
    assert header.instance.slice_position == pytest.approx(float(ds.ImagePositionPatient[2]))
    assert header.instance.instance_number == int(ds.InstanceNumber)


def test_meta_must_agree_with_the_dataset(ct_files: list[Path]) -> None:
    data = ct_files[0].read_bytes()
    ct_class = b"1.2.840.10008.5.1.4.1.1.2\0"
    offset = dataset_offset(data)
    meta = data[:offset].replace(ct_class, MRImageStorage.encode() + b"\0", 1)  # same length
    assert meta != data[:offset]
    with pytest.raises(SOPClassMismatchError):
        parse_header(meta + data[offset:])
    with pytest.raises(InvalidDatasetError, match="no SOPInstanceUID"):
        parse_header(_encoded(ct_files[0], SOPInstanceUID=None))


def test_dataset_offset_skips_preamble_and_meta(ct_files: list[Path]) -> None:
    data = ct_files[0].read_bytes()
    offset = dataset_offset(data)
    assert offset > 132 and data[offset : offset + 2] == b"\x08\x00"  # group 0008 follows
    with pytest.raises(InvalidDatasetError, match="DICM"):
        dataset_offset(b"\0" * 200)
