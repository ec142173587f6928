"""Reconciling files left without index rows, and rebuilding the index from storage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from dicom_node.models import Instance, Series
from dicom_node.storage.reindex import (
    RECONCILED_AET,
    StorageBusyError,
    reconcile_at_start,
    reindex,
    series_folders,
    storage_lock,
)
from tests.support.data import encoded_files
from tests.support.indexed import IndexedNode


def count(node: IndexedNode) -> int:
    with node.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def test_start_up_indexes_a_file_renamed_but_not_committed(
    indexed_node: IndexedNode, ct_files: list[Path]
) -> None:
    """A crash between rename and commit: the file is at its final path without a row."""
    stored = [
        indexed_node.store.store_encoded(d, calling_aet="CT", peer="p")
        for d in encoded_files(ct_files[0].parent)[:3]
    ]
    orphan = stored[-1]
    with indexed_node.sessions() as s, s.begin():
        s.execute(delete(Instance).where(Instance.sop_instance_uid == orphan.sop_instance_uid))
    report = reconcile_at_start(indexed_node.store, indexed_node.sessions)
    assert report is not None
    assert report.added == [orphan.path.relative_to(indexed_node.store.root).as_posix()]
    with indexed_node.sessions() as s:
        row = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == orphan.sop_instance_uid)
        ).one()
        assert row.calling_aet == RECONCILED_AET and row.sha256 == orphan.sha256
    assert count(indexed_node) == 3


def test_start_up_looks_only_at_recent_folders(
    indexed_node: IndexedNode, ct_files: list[Path]
) -> None:
    first = indexed_node.store.store_encoded(ct_files[0].read_bytes(), calling_aet="A", peer="p")
    old = time.time() - 3 * 3600
    os.utime(first.path.parent, (old, old))
    with indexed_node.sessions() as s, s.begin():
        s.execute(delete(Instance))
        s.execute(delete(Series))
    # an empty index beside stored series is not rebuilt silently: reindex is the tool
    assert reconcile_at_start(indexed_node.store, indexed_node.sessions) is None
    assert list(series_folders(indexed_node.store.root))
    assert list(series_folders(indexed_node.store.root, since=time.time() - 3600)) == []


def test_reindex_rebuilds_and_drops_rows_of_missing_files(
    indexed_node: IndexedNode, ct_files: list[Path]
) -> None:
    n = indexed_node.ingest(ct_files[0].parent)
    paths = sorted(indexed_node.store.root.rglob("*.dcm"))
    paths[0].unlink()
    (paths[1].parent / "notes.txt").write_text("not dicom")
    broken = paths[2].parent / "1.2.3.4.dcm"
    broken.write_bytes(b"garbage")
    with indexed_node.sessions() as s, s.begin():
        s.execute(delete(Instance).where(Instance.path.like("%" + paths[3].name)))
    report = reindex(indexed_node.store)
    assert len(report.removed) == 1 and report.removed[0].endswith(paths[0].name)
    assert [rel for rel in report.added] == [
        paths[3].relative_to(indexed_node.store.root).as_posix()
    ]
    assert [rel for rel, _ in report.skipped] == [
        broken.relative_to(indexed_node.store.root).as_posix()
    ]
    assert count(indexed_node) == n - 1
    with indexed_node.sessions() as s:
        assert s.scalars(select(Series)).one().number_of_instances == n - 1


def test_storage_lock_keeps_reindex_from_a_running_node(tmp_path: Path) -> None:
    with (
        storage_lock(tmp_path, exclusive=False),
        storage_lock(tmp_path, exclusive=False),
        pytest.raises(StorageBusyError, match="stop it first"),
        storage_lock(tmp_path, exclusive=True),
    ):
        pass
    with storage_lock(tmp_path, exclusive=True):
        pass
