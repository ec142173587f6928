"""A throwaway PostgreSQL cluster for tests: Debian's server binaries on a free loopback port.

``initdb`` and ``postgres`` refuse to run as root, so under root (CI runs as root) the cluster
is made and run as the ``postgres`` system user through ``runuser``, with its data in a fresh
temporary folder that user owns; under any other user it runs as that user. The cluster listens
on 127.0.0.1 only, with a random password (no other local user can reach it), and runs without
fsync: it lives for one test session and is deleted when stopped.

:func:`require_cluster` starts one, or skips the test with the reason when it cannot; under the
test command (``scripts/test.sh``, which installs PostgreSQL and sets ``MRCT_REQUIRE_POSTGRES=1``)
it fails instead, so CI never passes with the PostgreSQL variants silently skipped.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.peers import free_port

if TYPE_CHECKING:  # the driver is the optional `postgres` extra: imported when used
    import psycopg

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SUPERUSER = "postgres"
SYSTEM_USER = "postgres"
REQUIRE_ENV = "MRCT_REQUIRE_POSTGRES"
DRIVER = "postgresql+psycopg"
START_TIMEOUT_S = 60

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",  # a test cluster: speed over durability
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",  # serve + three workers + the test's own engines
    "shared_buffers": "32MB",
}


class PostgresUnavailableError(RuntimeError):
    """PostgreSQL cannot be started here (not installed, no user to run it as, start failed)."""


def server_bin_dir() -> Path | None:
    """The newest installed server's bin folder (holding ``initdb``), or None."""
    found = sorted(Path(p).parent for p in glob.glob(f"{PG_BIN_GLOB}/initdb"))
    return found[-1] if found else None


def _system_user() -> pwd.struct_passwd | None:
    """The user the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresUnavailableError(
            f"running as root and there is no {SYSTEM_USER!r} system user to run the server "
            "(initdb refuses root; the Debian package creates that user)"
        ) from None
    if shutil.which("runuser") is None:
        raise PostgresUnavailableError(
            "running as root without runuser (util-linux) to drop to postgres"
        )
    return user


@dataclass
class PostgresCluster:
    """One running throwaway cluster; :meth:`create_database` gives each test its own database."""

    base: Path
    bin_dir: Path
    port: int
    password: str
    user: pwd.struct_passwd | None

    @property
    def data_dir(self) -> Path:
        """The cluster's data folder."""
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        """The server log."""
        return self.base / "server.log"

    def _run(self, program: str, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        cmd = [str(self.bin_dir / program), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user.pw_name, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = (
                self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            )
            raise PostgresUnavailableError(
                f"{program} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{log}"
            )

    def start(self) -> PostgresCluster:
        """initdb (with a random superuser password) and start on 127.0.0.1:port."""
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()
        options = [f"-c port={self.port}", f"-c unix_socket_directories={self.base}"]
        options += [f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "-o",
            " ".join(options),
            "start",
        )
        return self

    def stop(self) -> None:
        """Stop the server at once and delete its folder."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` on this cluster."""
        return f"{DRIVER}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A plain psycopg connection in autocommit mode (for administration)."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname=database,
            autocommit=True,
        )

    def create_database(self) -> str:
        """A new empty database; its name."""
        from psycopg import sql

        name = f"t_{secrets.token_hex(6)}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connection a test left open."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def client(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a client program of the server's version (``pg_dump``, ``pg_restore``, ``psql``)
        connected to this cluster as the superuser; raises when it fails."""
        env = {**os.environ, "PGPASSWORD": self.password}
        cmd = [str(self.bin_dir / program), "-h", "127.0.0.1", "-p", str(self.port)]
        done = subprocess.run(
            [*cmd, "-U", SUPERUSER, *args], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done

    def psql(self, database: str, script: Path) -> None:
        """Run an SQL script with the server's own ``psql`` (stops at the first error)."""
        self.client("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database, "-f", str(script))


def start_cluster() -> PostgresCluster:
    """Make and start a cluster; raises :class:`PostgresUnavailableError` saying why it cannot."""
    if importlib.util.find_spec("psycopg") is None:
        raise PostgresUnavailableError(
            "the PostgreSQL driver psycopg is not installed (pip install -e '.[postgres]')"
        )
    bin_dir = server_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailableError(
            f"PostgreSQL server binaries not found ({PG_BIN_GLOB}/initdb; apt-get install "
            "postgresql, or run scripts/test.sh which installs it)"
        )
    user = _system_user()
    # Not below pytest's basetemp: that folder is private to us and the server user must enter.
    base = Path(tempfile.mkdtemp(prefix="mrct-pg-"))
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
    cluster = PostgresCluster(base, bin_dir, free_port(), secrets.token_hex(16), user)
    try:
        return cluster.start()
    except (PostgresUnavailableError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        raise PostgresUnavailableError(str(exc)) from exc


def require_cluster() -> PostgresCluster:
    """A started cluster, or skip (fail under ``scripts/test.sh``) with the reason."""
    try:
        return start_cluster()
    except PostgresUnavailableError as exc:
        reason = f"PostgreSQL test cluster unavailable: {exc}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the PostgreSQL tests must run)")
        pytest.skip(reason)
