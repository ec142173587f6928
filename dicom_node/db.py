"""Database engine, sessions and forward migrations (the only place engines are made).

One engine per process. SQLite runs in WAL mode with foreign keys, a busy timeout (the SCP and
the worker are separate processes sharing the file) and ``synchronous=FULL`` so that an index
row is durable when the C-STORE response says Success.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, select, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import StorageError
from dicom_node.models import SCHEMA_V1_TABLES, SCHEMA_V2_TABLES, Base, SchemaVersion

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=FULL")
    finally:
        cur.close()


def make_engine(url: str) -> Engine:
    """Create the process's engine; for SQLite create the folder and set the pragmas."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {}
    if is_sqlite:
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the database folder for {db}: {exc}") from exc
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    engine = create_engine(url, **kwargs)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine`` (objects stay usable after commit)."""
    return sessionmaker(engine, expire_on_commit=False)


def _v1(conn: Connection) -> None:
    """Version 1: patients, studies, series, instances."""
    Base.metadata.create_all(conn, tables=[t.__table__ for t in SCHEMA_V1_TABLES], checkfirst=True)  # type: ignore[misc]


def _v2(conn: Connection) -> None:
    """Version 2 (orchestration, issue 5): series progress, pairing decisions, jobs, sends."""
    Base.metadata.create_all(conn, tables=[t.__table__ for t in SCHEMA_V2_TABLES], checkfirst=True)  # type: ignore[misc]


# MIGRATIONS[i] upgrades a database from version i to version i + 1. Append, never edit.
MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(engine: Engine) -> int:
    """The version the database is at (0 for an empty database)."""
    with engine.connect() as conn:
        if not engine.dialect.has_table(conn, SchemaVersion.__tablename__):
            return 0
        return int(conn.scalar(select(SchemaVersion.version).where(SchemaVersion.id == 1)) or 0)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to :data:`SCHEMA_VERSION`, one step at a time."""
    with engine.begin() as conn:
        SchemaVersion.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
        current = int(conn.scalar(select(SchemaVersion.version).where(SchemaVersion.id == 1)) or 0)
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"database schema version {current} is newer than this software "
                f"({SCHEMA_VERSION}); upgrade dicom-node"
            )
        for version in range(current, SCHEMA_VERSION):
            log.info("migrating database schema %d -> %d", version, version + 1)
            MIGRATIONS[version](conn)
        if current != SCHEMA_VERSION:
            now = datetime.now(UTC).replace(tzinfo=None)
            if current == 0:
                conn.execute(
                    insert(SchemaVersion).values(id=1, version=SCHEMA_VERSION, migrated_at=now)
                )
            else:
                conn.execute(
                    update(SchemaVersion)
                    .where(SchemaVersion.id == 1)
                    .values(version=SCHEMA_VERSION, migrated_at=now)
                )
