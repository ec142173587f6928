"""Store and index against a real database (SQLite on disk and PostgreSQL; no network)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, select, text

from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.errors import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    ConflictingInstanceError,
    InvalidDatasetError,
    InvalidUIDError,
    StorageError,
    StorageFullError,
)
from dicom_node.models import Instance, Series
from dicom_node.storage.header import dataset_offset
from dicom_node.storage.store import Store

# The tests write deliberately invalid datasets; pydicom warns while reading them back.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> Store:
    return Store(tmp_path / "storage", session_factory(engine), min_free_mb=1)


def encoded(path: Path, **changes: object) -> bytes:
    """Part-10 bytes of ``path`` (as the SCP hands them over), optionally modified."""
    if not changes:
        return path.read_bytes()
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_store_writes_bytes_and_indexes(store: Store, engine: Engine, ct_files: list[Path]) -> None:
    data = encoded(ct_files[0])
    result = store.store_encoded(data, calling_aet="CT1", peer="127.0.0.1:1")
    ds = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    assert not result.duplicate
    assert result.path == (
        store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    )
    assert result.path.read_bytes() == data
    assert [p.name for p in files_under(store.root)] == [result.path.name]  # no temp left
    with session_factory(engine)() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.sha256 == result.sha256
        assert inst.size == len(data)
        series = s.scalars(select(Series)).one()
        assert series.number_of_instances == 1
        assert series.modality == "CT"
        assert series.calling_aet == "CT1"
        assert series.study.patient.patient_id == ds.PatientID
        assert series.study.study_date == ds.StudyDate


def test_identical_resend_is_noop(store: Store, engine: Engine, ct_files: list[Path]) -> None:
    data = encoded(ct_files[1])
    first = store.store_encoded(data, calling_aet="A", peer="p")
    again = store.store_encoded(data, calling_aet="B", peer="p")
    assert again.duplicate and again.path == first.path
    with session_factory(engine)() as s:
        assert s.scalars(select(Series)).one().number_of_instances == 1


def test_vanished_file_is_restored_on_resend(store: Store, ct_files: list[Path]) -> None:
    data = encoded(ct_files[1])
    first = store.store_encoded(data, calling_aet="A", peer="p")
    first.path.unlink()
    store.store_encoded(data, calling_aet="A", peer="p")
    assert first.path.read_bytes() == data


def test_same_uid_different_content_refused(store: Store, ct_files: list[Path]) -> None:
    first = store.store_encoded(encoded(ct_files[2]), calling_aet="A", peer="p")
    before = first.path.read_bytes()
    with pytest.raises(ConflictingInstanceError) as err:
        store.store_encoded(encoded(ct_files[2], InstanceNumber=999), calling_aet="A", peer="p")
    assert err.value.status == STATUS_DATASET_MISMATCH
    assert first.path.read_bytes() == before
    assert len(files_under(store.root)) == 1


def test_study_of_another_patient_refused(store: Store, ct_files: list[Path]) -> None:
    store.store_encoded(encoded(ct_files[3]), calling_aet="A", peer="p")
    other = encoded(ct_files[4], PatientID="SOMEONE-ELSE")
    with pytest.raises(ConflictingInstanceError):
        store.store_encoded(other, calling_aet="A", peer="p")
    assert len(files_under(store.root)) == 1


def test_known_series_under_another_study_refused(store: Store, ct_files: list[Path]) -> None:
    store.store_encoded(encoded(ct_files[3]), calling_aet="A", peer="p")
    moved = encoded(ct_files[4], StudyInstanceUID="1.2.826.0.1.3680043.8.498.4242")
    with pytest.raises(ConflictingInstanceError, match="different study"):
        store.store_encoded(moved, calling_aet="A", peer="p")
    assert len(files_under(store.root)) == 1


def test_new_series_in_study_of_another_patient_refused(store: Store, ct_files: list[Path]) -> None:
    store.store_encoded(encoded(ct_files[3]), calling_aet="A", peer="p")
    other = encoded(
        ct_files[4], PatientID="SOMEONE-ELSE", SeriesInstanceUID="1.2.826.0.1.3680043.8.498.4343"
    )
    with pytest.raises(ConflictingInstanceError, match="different patient"):
        store.store_encoded(other, calling_aet="A", peer="p")
    assert len(files_under(store.root)) == 1


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"SOPInstanceUID": None}, InvalidDatasetError),
        ({"SeriesInstanceUID": None}, InvalidDatasetError),
        ({"StudyInstanceUID": "../../etc"}, InvalidUIDError),
        ({"SeriesInstanceUID": "1.2." + "3" * 70}, InvalidUIDError),
    ],
)
def test_invalid_datasets_refused(
    store: Store, ct_files: list[Path], changes: dict[str, object], error: type[Exception]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we write
        data = encoded(ct_files[5], **changes)
    with pytest.raises(error) as err:
        store.store_encoded(data, calling_aet="A", peer="p")
    assert getattr(err.value, "status", None) == STATUS_CANNOT_UNDERSTAND
    assert files_under(store.root) == []


def test_garbage_refused(store: Store, ct_files: list[Path]) -> None:
    data = bytearray(encoded(ct_files[6]))
    with pytest.raises(InvalidDatasetError):
        store.store_encoded(b"\x00" * 200, calling_aet="A", peer="p")
    off = dataset_offset(bytes(data))
    data[off + 4 : off + 8] = b"\xff\xff\xff\x7f"  # absurd length of the first element
    with pytest.raises(InvalidDatasetError):
        store.store_encoded(bytes(data), calling_aet="A", peer="p")
    assert files_under(store.root) == []


def test_free_space_floor(tmp_path: Path, engine: Engine, ct_files: list[Path]) -> None:
    store = Store(tmp_path / "full", session_factory(engine), min_free_mb=10**12)
    with pytest.raises(StorageFullError) as err:
        store.store_encoded(encoded(ct_files[7]), calling_aet="A", peer="p")
    assert err.value.status == STATUS_OUT_OF_RESOURCES
    assert files_under(store.root) == []


REFUSE_INSERTS = {
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE INSERT ON instances "
        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT ON instances FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}
"""A trigger that makes every instance insert fail, per backend."""


def test_index_failure_leaves_no_file(store: Store, engine: Engine, ct_files: list[Path]) -> None:
    with engine.begin() as conn:
        for statement in REFUSE_INSERTS[engine.dialect.name]:
            conn.execute(text(statement))
    with pytest.raises(StorageError) as err:
        store.store_encoded(encoded(ct_files[8]), calling_aet="A", peer="p")
    assert err.value.status == STATUS_OUT_OF_RESOURCES
    assert files_under(store.root) == []
    with session_factory(engine)() as s:
        assert s.scalars(select(Series)).all() == []


def test_instance_paths_in_slice_order(store: Store, ct_files: list[Path]) -> None:
    chosen = ct_files[9:14]
    for f in reversed(chosen):
        store.store_encoded(encoded(f), calling_aet="A", peer="p")
    series_uid = pydicom.dcmread(chosen[0], stop_before_pixels=True).SeriesInstanceUID
    paths = store.instance_paths(series_uid)
    positions = [
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in paths
    ]
    assert len(paths) == len(chosen)
    assert positions == sorted(positions)


def test_concurrent_stores_one_series(store: Store, engine: Engine, ct_files: list[Path]) -> None:
    chosen = ct_files[20:32]
    errors: list[BaseException] = []

    def send(f: Path) -> None:
        try:
            store.store_encoded(encoded(f), calling_aet="A", peer="p")
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(f,)) for f in chosen]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    with session_factory(engine)() as s:
        assert s.scalars(select(Series)).one().number_of_instances == len(chosen)
        assert len(s.scalars(select(Instance)).all()) == len(chosen)
