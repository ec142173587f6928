"""Engine and migrations: Alembic to head, idempotent, racing processes, the migration lock,
legacy databases; on SQLite and on PostgreSQL."""

from __future__ import annotations

import fcntl
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.engine import make_url

from dicom_node.db import (
    PG_MIGRATION_LOCK,
    clock_skew_seconds,
    current_revision,
    head_revision,
    make_engine,
    migrate,
    redacted_url,
    session_factory,
)
from dicom_node.errors import ConfigError, StorageError
from dicom_node.models import Base, Job, Patient, Send, Series, utcnow
from dicom_node.states import JobState, SendState, SeriesState
from tests.peers import FIXTURES, wait_until
from tests.peers.postgres import PostgresCluster

LEGACY_DUMP = FIXTURES / "legacy" / "index_schema_v2.sql"
LEGACY_PG_DUMP = FIXTURES / "legacy" / "index_schema_v2.postgresql.sql"
BLOCKED_CHECK_S = 1.0
"""How long a migration is watched to stay blocked while another process holds the lock."""


def schema_differences(engine: Engine) -> list[object]:
    """What Alembic's autogenerate finds between the migrated database and the models."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def legacy_engine(database_url: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A database holding an index of the hand-written schema version 2, with its rows."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        db = Path(url.database)
        db.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(db) as con:
            con.executescript(LEGACY_DUMP.read_text())
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        assert url.database is not None
        cluster.psql(url.database, LEGACY_PG_DUMP)
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


def test_migrate_creates_head_and_is_idempotent(engine: Engine) -> None:
    assert current_revision(engine) is None
    migrate(engine)
    migrate(engine)
    assert current_revision(engine) == head_revision()
    names = set(inspect(engine).get_table_names())
    assert {"patients", "studies", "series", "instances", "jobs", "sends"} <= names
    assert "schema_version" not in names
    assert schema_differences(engine) == []  # the revisions build exactly the models' schema
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_database_of_newer_software_is_refused(engine: Engine) -> None:
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    with pytest.raises(StorageError, match="newer"):
        migrate(engine)


def test_legacy_schema_v2_database_is_upgraded_with_its_data(legacy_engine: Engine) -> None:
    eng = legacy_engine
    migrate(eng)
    assert current_revision(eng) == head_revision()
    assert "schema_version" not in inspect(eng).get_table_names()
    assert schema_differences(eng) == []
    sessions = session_factory(eng)
    with sessions() as s:
        patient = s.scalars(select(Patient)).one()
        assert (patient.patient_id, patient.patient_name) == ("LEGACY-1", "Doe^Jane")
        assert {x.state for x in s.scalars(select(Series))} == {SeriesState.COMPLETE}
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.DONE and [st.stage for st in job.stages] == ["registering"]
        assert s.scalars(select(Send)).one().state is SendState.DONE
    with sessions() as s:  # new rows still get fresh ids (PostgreSQL: the sequences survived)
        now = utcnow()
        s.add(Job(ct_series_uid="1.2", mr_series_uid="1.3", created_at=now, updated_at=now))
        s.commit()
        assert sorted(s.scalars(select(Job.id))) == [1, 2]


def test_unknown_legacy_version_is_refused(legacy_engine: Engine) -> None:
    with legacy_engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 1"))
    with pytest.raises(StorageError, match="version 1"):
        migrate(legacy_engine)


def test_processes_racing_to_migrate_one_database(database_url: str) -> None:
    """serve and several workers start at once: every one migrates, none fails."""
    code = (
        "import sys; from dicom_node.db import make_engine, migrate; "
        "migrate(make_engine(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, database_url], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    eng = make_engine(database_url)
    assert current_revision(eng) == head_revision()
    eng.dispose()


@contextmanager
def migration_lock_held_elsewhere(engine: Engine) -> Iterator[None]:
    """Hold the migration lock as another process would: the advisory lock on PostgreSQL, the
    file lock beside a SQLite database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            yield
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
        return
    db = engine.url.database
    assert db is not None
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.migrate.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def _advisory_waiters(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar_one()
        )


def test_migration_waits_for_the_lock_another_process_holds(engine: Engine) -> None:
    """Migrations are serialised across processes: while the lock is held elsewhere nothing
    is created; once it is released the waiting migration runs to head."""
    done = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            migrate(engine)
        except BaseException as exc:  # re-raised in the test thread
            failures.append(exc)
        done.set()

    with migration_lock_held_elsewhere(engine):
        thread = threading.Thread(target=run)
        thread.start()
        if engine.dialect.name == "postgresql":  # the server shows the migration waiting
            wait_until(lambda: _advisory_waiters(engine) == 1, timeout=30, what="lock waiter")
        assert not done.wait(BLOCKED_CHECK_S)
        assert current_revision(engine) is None
    thread.join(60)
    assert done.is_set() and not failures, failures
    assert current_revision(engine) == head_revision()


def test_missing_database_driver_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not installed"):
        make_engine("mysql://node@db.example/index")


def test_displayed_database_urls_hide_the_password() -> None:
    shown = redacted_url("postgresql+psycopg://node:s3cret@db.example:5432/index")
    assert "s3cret" not in shown and shown.startswith("postgresql+psycopg://node:***@db.example")


def test_clock_skew_is_measured_against_the_database_server(engine: Engine) -> None:
    skew = clock_skew_seconds(engine)
    if engine.dialect.name == "sqlite":
        assert skew is None  # the database lives on this machine's clock
    else:
        assert skew is not None and abs(skew) < 1.0  # the server runs on this machine here


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
