"""The worker's series source: stored files in slice order, clear errors when storage is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from dicom_node.errors import StorageError
from dicom_node.storage.source import (
    FileSeriesSource,
    SeriesSource,
    check_storage_root,
    series_source,
)
from tests.support.indexed import IndexedNode


def _some_slices(ct_files: list[Path], folder: Path) -> str:
    """Copy five CT slices (in reverse order) to ``folder``; their series UID."""
    folder.mkdir()
    for f in reversed(ct_files[10:15]):
        shutil.copy(f, folder / f.name)
    return str(pydicom.dcmread(ct_files[10], stop_before_pixels=True).SeriesInstanceUID)


def test_file_source_gives_the_stored_files_in_slice_order(
    indexed_node: IndexedNode, ct_files: list[Path], tmp_path: Path
) -> None:
    node = indexed_node
    uid = _some_slices(ct_files, tmp_path / "in")
    assert node.ingest(tmp_path / "in") == 5
    source: SeriesSource = series_source(node.config, node.sessions)
    with source.open_series(uid) as paths:
        z = [
            float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
            for p in paths
        ]
        assert len(paths) == 5 and all(p.is_relative_to(node.config.storage.root) for p in paths)
        assert z == sorted(z)
    with source.open_series("1.2.3.4") as unknown:
        assert unknown == []


def test_file_source_names_files_this_machine_cannot_read(
    indexed_node: IndexedNode, ct_files: list[Path], tmp_path: Path
) -> None:
    node = indexed_node
    uid = _some_slices(ct_files, tmp_path / "in")
    node.ingest(tmp_path / "in")
    elsewhere = FileSeriesSource(node.sessions, tmp_path / "not-mounted")
    with pytest.raises(StorageError, match="shared storage mounted"), elsewhere.open_series(uid):
        pass


def test_worker_refuses_a_storage_root_serve_never_used(
    indexed_node: IndexedNode, tmp_path: Path
) -> None:
    check_storage_root(indexed_node.config.storage.root)  # the store made its staging folder
    empty = tmp_path / "empty-mount-point"
    empty.mkdir()
    with pytest.raises(StorageError, match="not the node's storage"):
        check_storage_root(empty)
