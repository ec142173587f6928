"""Root fixtures shared by every test area: real peers, running nodes, the small fixtures.

Fixtures only: the helpers they use are plain modules in ``tests/peers`` and ``tests/support``,
which tests import directly (never from a conftest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.node import NodeProcess, node_config, start_node
from tests.peers.orthanc import Orthanc, require_orthanc
from tests.peers.postgres import PostgresCluster, require_cluster
from tests.support.data import SMALL_CT, SMALL_MR, fixture_files
from tests.support.indexed import DATABASE_BACKENDS, IndexedNode, make_indexed_node


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Orthanc]]:
    """Make started Orthanc servers (keywords as for ``Orthanc``); all killed at teardown."""
    require_orthanc()
    made: list[Orthanc] = []

    def make(**kwargs: Any) -> Orthanc:
        server = Orthanc(tmp_path_factory.mktemp("orthanc"), **kwargs)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop(graceful=False)


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    """A fresh, started Orthanc (AE ``ORTHANC``, accepts any caller) on free loopback ports."""
    return orthanc_factory()


@pytest.fixture
def node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``dicom-node serve``: ``make(**sections)`` merges sections into the test config.

    Every node still running at teardown is killed with its process group.
    """
    nodes: list[NodeProcess] = []

    def make(**sections: Any) -> NodeProcess:
        workdir = tmp_path_factory.mktemp("node")
        node = start_node(workdir, node_config(workdir, **sections))
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.proc.poll() is None:
            node.kill()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node (any caller allowed) shared by a test module; must exit 0 on SIGTERM."""
    workdir = tmp_path_factory.mktemp("shared-node")
    node = start_node(workdir, node_config(workdir))
    yield node
    rc = node.stop()
    assert rc == 0, node.log()


@pytest.fixture(scope="session")
def ct_files() -> list[Path]:
    """The committed small CT fixture series."""
    return fixture_files(SMALL_CT)


@pytest.fixture(scope="session")
def mr_files() -> list[Path]:
    """The committed small MR fixture series."""
    return fixture_files(SMALL_MR)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the whole session, stopped and deleted at its end.

    Skipped with the reason when PostgreSQL cannot start here; under ``scripts/test.sh`` (CI)
    that is a failure instead.
    """
    cluster = require_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=DATABASE_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database: each test using it runs on SQLite and on PostgreSQL.

    SQLite: a file under ``tmp_path``. PostgreSQL: a fresh database on the session's cluster,
    dropped after the test.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'index.sqlite3'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = postgres_cluster.create_database()
    yield postgres_cluster.url(name)
    postgres_cluster.drop_database(name)


@pytest.fixture
def indexed_node(tmp_path: Path, database_url: str) -> Iterator[IndexedNode]:
    """A config, index and store under ``tmp_path`` with fast orchestration settings
    (on SQLite and on PostgreSQL: see ``database_url``)."""
    node = make_indexed_node(tmp_path, database={"url": database_url})
    yield node
    node.close()


@pytest.fixture
def postgres_node(tmp_path: Path, postgres_url: str) -> Iterator[IndexedNode]:
    """An :func:`indexed_node` on PostgreSQL only (tests of row locks and other PG behaviour)."""
    node = make_indexed_node(tmp_path, database={"url": postgres_url})
    yield node
    node.close()
