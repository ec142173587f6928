"""Database engine, sessions and schema migrations (the only place engines are made).

One engine per process. SQLite runs in WAL mode with foreign keys, a busy timeout (the SCP and
the worker are separate processes sharing the file) and ``synchronous=FULL`` so that an index
row is durable when the C-STORE response says Success. PostgreSQL (``postgresql+psycopg://``,
the ``postgres`` extra) is the backend for workers on several machines; its pooled connections
are checked before use, so a restarted or failed-over server costs a reconnect, not an error.

The schema is migrated with Alembic (revisions in :mod:`dicom_node.migrations`) by
:func:`migrate`, which every process calls at start-up; concurrent starts are serialised by a
lock (a file lock beside a SQLite database, an advisory lock on PostgreSQL). A database made by
the hand-written versioning of earlier releases (table ``schema_version`` at 2) is adopted: it
holds exactly the baseline revision's tables, so it is stamped with it and upgraded from there.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LEGACY_VERSION_TABLE = "schema_version"
LEGACY_BASELINE = ("0001", 2)
"""The Alembic revision a database of the hand-written schema version 2 is stamped with."""
PG_MIGRATION_LOCK = 0x4D52_4354  # "MRCT": the advisory lock key of migrations on PostgreSQL


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=FULL")
    finally:
        cur.close()


def _sqlite_file(engine_or_url: Engine | str) -> Path | None:
    """The database file of a SQLite URL (None for other backends and in-memory databases)."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    db = url.database
    if url.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def redacted_url(url: str) -> str:
    """``url`` for display: the password (if the URL holds one) replaced by ``***``."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """Create the process's engine; for SQLite create the folder and set the pragmas."""
    kwargs: dict[str, Any] = {}
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    db_file = _sqlite_file(url)
    if db_file is not None:
        try:
            db_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the database folder for {db_file}: {exc}") from exc
    if is_sqlite:
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(url, **kwargs)
    except ImportError as exc:
        raise ConfigError(
            f"database.url needs the database driver {exc.name!r}, which is not installed "
            f"(PostgreSQL: pip install 'mrct-fusion-node[postgres]' and a "
            f"postgresql+psycopg:// URL)"
        ) from None
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine`` (objects stay usable after commit)."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision this software knows."""
    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    if head is None:
        raise StorageError("no database migrations found in the installation")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty or legacy database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations of one database across processes (serve, workers, CLI)."""
    db_file = _sqlite_file(engine)
    if db_file is not None:
        with open(db_file.with_name(db_file.name + ".migrate.lock"), "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield
        return
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
        return
    yield


def _adopt_legacy(conn: Connection, cfg: Config) -> None:
    """Stamp a database of the hand-written versioning with the matching Alembic revision."""
    tables = inspect(conn).get_table_names()
    if LEGACY_VERSION_TABLE not in tables or "alembic_version" in tables:
        return
    version = conn.execute(
        text(f"SELECT version FROM {LEGACY_VERSION_TABLE} WHERE id = 1")
    ).scalar()
    revision, expected = LEGACY_BASELINE
    if version != expected:
        raise StorageError(
            f"database schema version {version} of an early release cannot be upgraded "
            f"automatically (only version {expected}); export and re-import the data"
        )
    log.info("adopting a database of schema version %d as revision %s", version, revision)
    command.stamp(cfg, revision)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest revision (idempotent, safe to race)."""
    head = head_revision()
    with _migration_lock(engine), engine.begin() as conn:
        cfg = _alembic_config(conn)
        _adopt_legacy(conn, cfg)
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        if current is not None and current not in _known_revisions():
            raise StorageError(
                f"database schema revision {current} is newer than this software ({head}); "
                "upgrade dicom-node"
            )
        log.info("migrating database schema %s -> %s", current or "(empty)", head)
        command.upgrade(cfg, "head")


def clock_skew_seconds(engine: Engine) -> float | None:
    """This machine's UTC clock minus the database server's, in seconds (None for SQLite,
    which lives on this machine's clock).

    Workers on several machines write heartbeats with their own clocks and judge each other's
    leases with theirs, so a clock far off the others' would take jobs from live workers.
    """
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        before = time.time()
        server = conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one()
        after = time.time()
    return (before + after) / 2 - float(server)


def _known_revisions() -> set[str]:
    script = ScriptDirectory(str(MIGRATIONS))
    return {rev.revision for rev in script.walk_revisions()}
