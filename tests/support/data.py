"""Test data: the committed small fixtures and datasets rewritten as other patients/series."""

from __future__ import annotations

import hashlib
import io
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.peers import FIXTURES

SMALL = FIXTURES / "mridir_small"
SMALL_CT = SMALL / "ct"
SMALL_MR = SMALL / "mr"
_UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
_DATE_TAGS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def require_small_fixtures() -> None:
    """Skip when the committed small fixtures are missing."""
    if not (any(SMALL_CT.glob("*.dcm")) and any(SMALL_MR.glob("*.dcm"))):
        pytest.skip(f"small fixtures missing in {SMALL} (tests/fixtures/make_fixtures.py)")


def fixture_files(folder: Path) -> list[Path]:
    """The .dcm files of a committed fixture folder, sorted (skip when missing)."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        pytest.skip(f"fixture series missing: {folder} (tests/fixtures/make_fixtures.py)")
    return files


def remap_uid(uid: str, salt: str) -> str:
    """Deterministic 2.25 UID for ``uid`` under ``salt``."""
    digest = hashlib.sha256(f"{salt}:{uid}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def rewrite_dataset(
    ds: Dataset,
    *,
    salt: str,
    patient_id: str | None = None,
    series_description: str | None = None,
    days_shift: int | None = None,
) -> Dataset:
    """Make ``ds`` another patient's / another series' instance (new UIDs, deterministic)."""
    for kw in _UID_TAGS:
        if kw in ds:
            setattr(ds, kw, remap_uid(str(getattr(ds, kw)), salt))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if patient_id is not None:
        ds.PatientID = patient_id
        ds.PatientName = f"TEST^{patient_id}"
    if series_description is not None:
        ds.SeriesDescription = series_description
    if days_shift:
        for kw in _DATE_TAGS:
            if kw in ds and str(getattr(ds, kw)):
                day = datetime.strptime(str(getattr(ds, kw))[:8], "%Y%m%d")
                setattr(ds, kw, (day + timedelta(days=days_shift)).strftime("%Y%m%d"))
    return ds


def copy_series(src: Path, dst: Path, **rewrite: Any) -> Path:
    """Copy every file of ``src`` to ``dst``, rewritten with :func:`rewrite_dataset`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        rewrite_dataset(ds, **rewrite)
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def encode(ds: Dataset) -> bytes:
    """Part-10 bytes of a dataset."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encoded_files(folder: Path) -> list[bytes]:
    """Part-10 bytes of every file of a folder."""
    return [f.read_bytes() for f in sorted(folder.glob("*.dcm"))]


def save_all(folder: Path, datasets: list[Dataset]) -> list[Path]:
    """Rewrite ``datasets`` into ``folder`` (replacing its .dcm files); return the paths."""
    for old in folder.glob("*.dcm"):
        old.unlink()
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"IM{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_back(ds: Dataset, tmp: Path, name: str) -> Dataset:
    """Write a dataset as a file and read it again (what a receiver sees)."""
    path = tmp / name
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)
