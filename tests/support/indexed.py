"""A node's config, database and store in a temporary folder, without network or processes.

Orchestration tests drive pairing, jobs and dispatch on it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig, read_config_file
from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.storage.store import Store
from tests.peers.node import FAST_ORCHESTRATION, node_config, write_config
from tests.support.data import encoded_files

DATABASE_BACKENDS = ("sqlite", "postgresql")
"""The backends every database test runs on (the ids of the ``database_url`` fixture)."""


@dataclass
class IndexedNode:
    """A config, database and store in a temporary folder (no network)."""

    config: NodeConfig
    engine: Engine
    sessions: sessionmaker[Session]
    store: Store

    def ingest(self, folder: Path, aet: str = "MODALITY") -> int:
        """Store every file of ``folder`` as if received from ``aet``; returns the count."""
        n = 0
        for data in encoded_files(folder):
            self.store.store_encoded(data, calling_aet=aet, peer="127.0.0.1")
            n += 1
        return n

    def close(self) -> None:
        """Release the store's threads and the engine."""
        self.store.close()
        self.engine.dispose()


def make_indexed_node(root: Path, **sections: Any) -> IndexedNode:
    """An :class:`IndexedNode` with the fast test config (plus ``sections``) under ``root``."""
    cfg = node_config(root, **{**FAST_ORCHESTRATION, **sections})
    config = read_config_file(write_config(root / "node.yaml", cfg))
    engine = make_engine(config.database_url)
    migrate(engine)
    sessions = session_factory(engine)
    store = Store(config.storage.root, sessions, config.storage.min_free_mb)
    return IndexedNode(config, engine, sessions, store)
