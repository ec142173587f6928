"""Bring the index back in line with the stored files.

Two uses of one walk over ``storage.root/<study>/<series>/<instance>.dcm``:

- :func:`reconcile_at_start` (every ``serve`` start, before listening): a crash between a
  file's rename into place and its index commit leaves a file without a row (never
  acknowledged, but stored). Only series folders modified within :data:`RECONCILE_WINDOW` of
  the newest indexed instance are looked at (a rename touches its folder), so a start stays
  fast on a large archive. Found instances are indexed as if just received.
- :func:`reindex` (``dicom-node reindex``, with the node stopped): every folder; rows whose file
  is missing are removed, files without a row (or whose row disagrees) are indexed.

A file is indexed only if it can be read in full and lies where its UIDs say; anything else is
reported and left alone (``dicom-node verify`` lists it). ``serve`` holds the storage lock
shared while it runs and ``reindex`` takes it exclusively, so the two never run together on one
storage root.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import NodeError, StorageError
from dicom_node.models import Instance, Series
from dicom_node.storage import index
from dicom_node.storage.derived import DERIVED_DIR
from dicom_node.storage.header import safe_uid
from dicom_node.storage.store import Store

log = logging.getLogger(__name__)

RECONCILE_WINDOW = timedelta(hours=1)
"""How far before the newest indexed instance start-up reconciliation looks for files."""
RECONCILED_AET = "(reconciled)"
REINDEXED_AET = "(reindex)"
"""Calling AE recorded for instances indexed from storage rather than received."""
LOCK_FILE = ".node.lock"


class StorageBusyError(StorageError):
    """The storage root is in use by a running node (or another reindex)."""


@contextmanager
def storage_lock(root: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the storage root's lock (shared: a running node; exclusive: reindex)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            raise StorageBusyError(
                f"{root} is in use by a running dicom-node serve (or reindex): stop it first"
            ) from None
        yield
    finally:
        os.close(fd)


@dataclass
class ReindexReport:
    """What a reconciliation or reindex found and did (relative paths)."""

    checked: int = 0
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    series: set[str] = field(default_factory=set)


def _uid_dirs(folder: Path) -> Iterator[os.DirEntry[str]]:
    """Sub-folders named like UIDs (skips .incoming, derived/, the index, anything else)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name == DERIVED_DIR or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                safe_uid(entry.name)
            except NodeError:
                continue
            yield entry


def series_folders(root: Path, since: float | None = None) -> Iterator[Path]:
    """``root/<study>/<series>`` folders (modified at or after ``since``, a POSIX time)."""
    for study in _uid_dirs(root):
        for series in _uid_dirs(Path(study.path)):
            if since is None or series.stat(follow_symlinks=False).st_mtime >= since:
                yield Path(series.path)


def _indexed(sessions: sessionmaker[Session], series_uid: str) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(
            select(Instance.path, Instance.size)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
        ).all()
    return {str(r.path): int(r.size) for r in rows}


def _reconcile_folder(
    store: Store, folder: Path, report: ReindexReport, *, calling_aet: str, remove_missing: bool
) -> None:
    sessions = store.sessions
    known = _indexed(sessions, folder.name)
    present: set[str] = set()
    for path in sorted(folder.glob("*.dcm")):
        rel = path.relative_to(store.root).as_posix()
        present.add(rel)
        report.checked += 1
        if known.get(rel) == path.stat().st_size:
            continue
        try:
            stored = store.adopt(path, calling_aet=calling_aet)
        except (NodeError, SQLAlchemyError, OSError) as exc:
            report.skipped.append((rel, str(exc)))
            log.warning("not indexed: %s: %s", rel, exc)
            continue
        if not stored.duplicate:
            (report.updated if rel in known else report.added).append(rel)
            report.series.add(stored.series_instance_uid)
    if remove_missing:
        for rel in sorted(set(known) - present):
            _remove_row(sessions, rel, report)


def _remove_row(sessions: sessionmaker[Session], rel: str, report: ReindexReport) -> None:
    uid = Path(rel).stem
    with sessions() as session, session.begin():
        index.remove_instance(session, uid)
    report.removed.append(rel)
    log.warning("index row of %s removed: its file is missing", rel)


def reindex(
    store: Store,
    *,
    since: float | None = None,
    calling_aet: str = REINDEXED_AET,
    remove_missing: bool = True,
) -> ReindexReport:
    """Index the files under the store's root (see module docstring)."""
    report = ReindexReport()
    seen: set[str] = set()
    for folder in series_folders(store.root, since):
        seen.add(folder.name)
        _reconcile_folder(
            store, folder, report, calling_aet=calling_aet, remove_missing=remove_missing
        )
    if remove_missing:  # series whose folder is gone altogether
        with store.sessions() as session:
            rows = session.execute(
                select(Instance.path, Series.series_instance_uid).join(
                    Series, Instance.series_pk == Series.id
                )
            ).all()
        for rel, series_uid in rows:
            if series_uid not in seen and not (store.root / rel).exists():
                _remove_row(store.sessions, str(rel), report)
    with store.sessions() as session, session.begin():  # counts as the rows now say
        index.recount_series(session, None if remove_missing else report.series)
    return report


def reconcile_at_start(store: Store, sessions: sessionmaker[Session]) -> ReindexReport | None:
    """Index files left without a row by a crash (see module docstring); None if not run."""
    with sessions() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
    if newest is None:
        if next(series_folders(store.root), None) is not None:
            log.error(
                "the index %s has no instances but %s holds stored series: rebuild the "
                "index with `dicom-node reindex` (with the node stopped)",
                store.guard.path or "database",
                store.root,
            )
        return None
    since = (newest.replace(tzinfo=UTC) - RECONCILE_WINDOW).timestamp()
    report = reindex(store, since=since, calling_aet=RECONCILED_AET, remove_missing=False)
    for rel in report.added + report.updated:
        log.warning("indexed %s, stored before a crash but not yet indexed", rel)
    return report
