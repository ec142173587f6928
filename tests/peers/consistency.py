"""Is a node's index consistent with its files? (every row's file exists with its size and
hash and can be read; no stored file without a row; nothing left in the staging folder)."""

from __future__ import annotations

from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.storage.pixels import PixelLimits
from dicom_node.storage.store import STAGING_DIR
from dicom_node.storage.verify import VerifyReport, verify
from tests.peers.node import NodeProcess


def index_report(node: NodeProcess) -> VerifyReport:
    """``dicom-node verify`` on the node's storage and index."""
    cfg = node.node_config()
    engine = make_engine(cfg.database_url)
    try:
        migrate(engine)
        return verify(cfg.storage.root, session_factory(engine), PixelLimits(65535))
    finally:
        engine.dispose()


def assert_consistent(node: NodeProcess, *, staging_empty: bool = True) -> VerifyReport:
    """Fail with the problems found when the index and the files disagree."""
    report = index_report(node)
    assert report.ok, f"problems: {report.problems[:5]}, unindexed: {report.unindexed[:5]}"
    if staging_empty:
        left = [p.name for p in (node.storage / STAGING_DIR).iterdir()]
        assert not left, f"staged files left behind: {left}"
    return report
