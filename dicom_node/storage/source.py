"""Where a worker reads received series from: one small interface, so storage can change.

Today every machine that runs a worker mounts the node's storage root (a local disk, NFS, a
shared volume; see docs/deployment.md) and :class:`FileSeriesSource` hands out the stored files
where they lie. An object store (S3 and the like) would implement :class:`SeriesSource` by
fetching a series' objects into a private temporary folder in :meth:`SeriesSource.open_series`
and deleting it when the block ends; the worker would not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.errors import StorageError
from dicom_node.storage.index import series_paths
from dicom_node.storage.store import STAGING_DIR


class SeriesSource(Protocol):
    """Gives a worker local files of a stored series."""

    def open_series(self, series_uid: str) -> AbstractContextManager[list[Path]]:
        """The series' files in slice order, readable until the ``with`` block ends.

        Empty when the index does not know the series (deleted by retention, say). Raises
        :class:`StorageError` when the index knows files this machine cannot read.
        """
        ...


@dataclass(frozen=True)
class FileSeriesSource:
    """Series read in place from ``root``, the storage root every machine mounts."""

    sessions: sessionmaker[Session]
    root: Path

    @contextmanager
    def open_series(self, series_uid: str) -> Iterator[list[Path]]:
        """The stored files themselves (nothing to clean up afterwards)."""
        paths = series_paths(self.sessions, self.root, series_uid)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise StorageError(
                f"{len(missing)} of {len(paths)} stored files of series {series_uid} are not "
                f"readable on this machine under storage.root {self.root} (first: "
                f"{missing[0].relative_to(self.root)}); is the shared storage mounted here?"
            )
        yield paths


def series_source(config: NodeConfig, sessions: sessionmaker[Session]) -> SeriesSource:
    """The series source of this deployment: the shared storage root."""
    return FileSeriesSource(sessions, config.storage.root)


def check_storage_root(root: Path) -> None:
    """Refuse to start a worker whose storage root is not the node's storage.

    ``dicom-node serve`` creates the staging folder there at start; a worker on another machine
    whose shared storage is not mounted sees an empty or missing folder instead and would fail
    every job it took. Raises :class:`StorageError` naming the folder.
    """
    if not (root / STAGING_DIR).is_dir():
        raise StorageError(
            f"storage.root {root} is not the node's storage (no {STAGING_DIR} folder made by "
            "`dicom-node serve`): mount the shared storage there, or start serve first"
        )
