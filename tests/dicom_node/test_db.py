"""Engine and migrations: Alembic to head, idempotent, racing processes, legacy databases."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from dicom_node.db import current_revision, head_revision, make_engine, migrate, session_factory
from dicom_node.errors import StorageError
from dicom_node.models import Job, Patient, Send, Series
from dicom_node.states import JobState, SendState, SeriesState
from tests.peers import FIXTURES

LEGACY_DUMP = FIXTURES / "legacy" / "index_schema_v2.sql"


def test_migrate_creates_head_and_is_idempotent(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    assert current_revision(eng) is None
    migrate(eng)
    migrate(eng)
    assert current_revision(eng) == head_revision()
    names = set(inspect(eng).get_table_names())
    assert {"patients", "studies", "series", "instances", "jobs", "sends"} <= names
    assert "schema_version" not in names
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    eng.dispose()


def test_database_of_newer_software_is_refused(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    migrate(eng)
    with eng.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    with pytest.raises(StorageError, match="newer"):
        migrate(eng)
    eng.dispose()


def test_legacy_schema_v2_database_is_upgraded_with_its_data(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    with sqlite3.connect(db) as con:
        con.executescript(LEGACY_DUMP.read_text())
    eng = make_engine(f"sqlite:///{db}")
    migrate(eng)
    assert current_revision(eng) == head_revision()
    assert "schema_version" not in inspect(eng).get_table_names()
    with session_factory(eng)() as s:
        patient = s.scalars(select(Patient)).one()
        assert (patient.patient_id, patient.patient_name) == ("LEGACY-1", "Doe^Jane")
        assert {x.state for x in s.scalars(select(Series))} == {SeriesState.COMPLETE}
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.DONE and [st.stage for st in job.stages] == ["registering"]
        assert s.scalars(select(Send)).one().state is SendState.DONE
    eng.dispose()


def test_unknown_legacy_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    with sqlite3.connect(db) as con:
        con.executescript(LEGACY_DUMP.read_text())
        con.execute("UPDATE schema_version SET version = 1")
    eng = make_engine(f"sqlite:///{db}")
    with pytest.raises(StorageError, match="version 1"):
        migrate(eng)
    eng.dispose()


def test_processes_racing_to_migrate_one_database(tmp_path: Path) -> None:
    """serve and several workers start at once: every one migrates, none fails."""
    url = f"sqlite:///{tmp_path / 'race.sqlite3'}"
    code = (
        "import sys; from dicom_node.db import make_engine, migrate; "
        "migrate(make_engine(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    eng = make_engine(url)
    assert current_revision(eng) == head_revision()
    eng.dispose()


def test_migrations_create_exactly_the_model_schema(tmp_path: Path) -> None:
    """Every table, column, index and constraint of models.py is what the revisions make."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from dicom_node.models import Base

    eng = make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    migrate(eng)
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    eng.dispose()
    assert diff == []
