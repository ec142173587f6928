"""Tables on every backend: state columns, naive UTC times and text widths behave the same on
SQLite (which ignores declared widths) and PostgreSQL (which enforces them)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import DateTime, Engine, String, inspect, select, text
from sqlalchemy.engine import make_url

from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.models import Base, EnumText, Job, Patient, Send, Series, Study, utcnow
from dicom_node.states import ALL_DERIVED_KINDS, JobState
from dicom_node.storage.store import Store

FAR_FROM_UTC = "Pacific/Chatham"
"""A session time zone 12:45 hours from UTC: naive UTC times must not move with it."""


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrate(eng)
    yield eng
    eng.dispose()


def _width(column: object) -> int | None:
    return getattr(column, "length", None)


def test_state_column_round_trip(engine: Engine) -> None:
    now = utcnow()
    with session_factory(engine)() as s:
        s.add(Job(ct_series_uid="1", mr_series_uid="2", created_at=now, updated_at=now))
        s.commit()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM jobs")).scalar() == "queued"
        conn.execute(text("UPDATE jobs SET state = 'done'"))
        conn.commit()
    with session_factory(engine)() as s:
        job = s.query(Job).one()
        assert job.state is JobState.DONE


def test_every_state_fits_its_column() -> None:
    """PostgreSQL refuses a value wider than VARCHAR(n); SQLite would store it silently."""
    checked = 0
    for table in Base.metadata.tables.values():
        for column in table.columns:
            if isinstance(column.type, EnumText):
                width = _width(column.type.impl_instance)
                assert width is not None
                longest = max((str(member) for member in column.type.enum), key=len)
                assert len(longest) <= width, f"{table.name}.{column.name}: {longest!r}"
                checked += 1
    assert checked >= 4  # series, pairing decisions, jobs, job stages, sends
    kinds_width = _width(Send.__table__.c.kinds.type)
    assert kinds_width is not None and len(",".join(ALL_DERIVED_KINDS)) <= kinds_width


def test_times_are_naive_utc_whatever_the_session_time_zone(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"options": f"-c timezone={FAR_FROM_UTC}"})
    eng = make_engine(url.render_as_string(hide_password=False))
    migrate(eng)
    now = utcnow()
    assert now.microsecond or utcnow().microsecond  # sub-second precision is exercised
    with session_factory(eng)() as s:
        s.add(Job(ct_series_uid="1", mr_series_uid="2", created_at=now, updated_at=now))
        s.commit()
    with session_factory(eng)() as s:
        stored = s.scalars(select(Job.created_at)).one()
    assert stored == now and stored.tzinfo is None
    created = {c["name"]: c["type"] for c in inspect(eng).get_columns("jobs")}["created_at"]
    assert isinstance(created, DateTime) and not created.timezone
    eng.dispose()


def _overlong(path: Path) -> bytes:
    """A received instance whose text values are wider than their index columns."""
    ds = pydicom.dcmread(path)
    buf = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the values we make too long
        ds.PatientName = "LONG^" + "N" * 400
        ds.StudyDescription = "D" * 100
        ds.SeriesDescription = "S" * 100
        ds.AccessionNumber = "A" * 40
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", *(["X" * 16] * 10)]
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")  # the store's parser meets the long values
def test_header_values_are_cut_to_their_column_widths(
    tmp_path: Path, engine: Engine, ct_files: list[Path]
) -> None:
    store = Store(tmp_path / "storage", session_factory(engine), min_free_mb=1)
    try:
        store.store_encoded(_overlong(ct_files[0]), calling_aet="CT", peer="127.0.0.1")
    finally:
        store.close()
    with session_factory(engine)() as s:
        values = {
            Patient.__table__.c.patient_name: s.scalars(select(Patient.patient_name)).one(),
            Study.__table__.c.study_description: s.scalars(select(Study.study_description)).one(),
            Study.__table__.c.accession_number: s.scalars(select(Study.accession_number)).one(),
            Series.__table__.c.series_description: s.scalars(
                select(Series.series_description)
            ).one(),
            Series.__table__.c.image_type: s.scalars(select(Series.image_type)).one(),
        }
    for column, value in values.items():
        assert isinstance(column.type, String) and value is not None
        assert len(value) == column.type.length, column.name
