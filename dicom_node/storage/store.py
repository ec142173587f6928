"""Atomic storage of received instances and their index rows.

``storage.root/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` holds the bytes exactly as received
(preamble + file meta + the peer's dataset encoding, never re-encoded). The SCP hands over the
file pynetdicom streamed the received dataset into (in the staging folder
``storage.root/.incoming``, so the rename is atomic); :meth:`Store.store_encoded` first writes
bytes given in memory there. The staged file is fsynced, checked in full
(:mod:`dicom_node.storage.validate`: every element, Pixel Data, the end of the data), matched
against its presentation context, renamed into place and its folder fsynced; the index row is
committed after the rename, and the file is removed again if the commit fails, so an instance is
never reported stored without being readable, durable *and* indexed.

Duplicate policy (patient safety first):
- same SOPInstanceUID, same dataset bytes (SHA-256 of everything after the file meta) and same
  transfer syntax: no-op success (a re-send, possibly from another AE);
- same SOPInstanceUID with different content or transfer syntax: refused
  (:class:`ConflictingInstanceError`, DIMSE 0xA900), the first instance is kept, a warning logged
  -- unless the stored copy cannot be read (stored by an earlier release that acknowledged
  truncated data): then the re-sent instance replaces it, with a WARNING;
- an instance whose Study or Series UID is already indexed under a different patient / study:
  refused the same way (mixing two patients' images is never silently accepted).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import DEFAULT_MAX_INSTANCE_MB, DEFAULT_MAX_ROWS_COLUMNS, StorageSection
from dicom_node.errors import (
    ConflictingInstanceError,
    InstanceTooLargeError,
    InvalidDatasetError,
    NodeError,
    SOPClassMismatchError,
    StorageError,
    StorageFullError,
)
from dicom_node.models import utcnow
from dicom_node.storage import index
from dicom_node.storage.fsutil import (
    FILE_MODE,
    fsync_dir,
    fsync_file,
    is_disk_full,
    make_dirs,
    temporary_name,
    unlink_quietly,
    write_durably,
)
from dicom_node.storage.header import Header, parse_header
from dicom_node.storage.index import IndexFileGuard, series_paths
from dicom_node.storage.pixels import PixelLimits
from dicom_node.storage.validate import CheckedFile, check_file

__all__ = ["STAGING_DIR", "Expected", "Store", "StoredInstance", "series_paths"]

log = logging.getLogger(__name__)

MB = 1024 * 1024

STAGING_DIR = ".incoming"
"""Folder below the storage root where received bytes are written before their rename."""

STAGED_PATTERNS = ("*.tmp", "tmp*.dcm")
"""Names of staged files (ours, and pynetdicom's temporary files) swept at start-up."""


@dataclass(frozen=True)
class Expected:
    """What the C-STORE request and its presentation context say the dataset is."""

    sop_class_uid: str
    transfer_syntax_uid: str
    request_sop_class_uid: str | None = None


@dataclass(frozen=True)
class StoredInstance:
    """What :meth:`Store.store_received` did with one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: Path
    size: int
    sha256: str
    duplicate: bool
    replaced: bool = False
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    """The patient, for the audit trail (which keeps only a keyed hash of it)."""


@dataclass(frozen=True)
class _Received:
    """One received instance on its way into the store."""

    header: Header
    checked: CheckedFile
    staged: Path
    rel: Path
    calling_aet: str
    peer: str

    def stored(
        self, path: Path, size: int, *, duplicate: bool, replaced: bool = False
    ) -> StoredInstance:
        h = self.header
        return StoredInstance(
            h.sop_instance_uid,
            h.sop_class_uid,
            h.series_uid,
            h.study_uid,
            path,
            size,
            self.checked.sha256,
            duplicate=duplicate,
            replaced=replaced,
            patient_id=h.patient.patient_id,
            issuer_of_patient_id=h.patient.issuer,
        )


def _os_error(action: str, path: Path, exc: OSError) -> NodeError:
    if is_disk_full(exc):
        return StorageFullError(f"{action} {path}: no space left on device")
    return StorageError(f"{action} {path}: {exc.strerror or exc}")


def _copy_into(src: Path, fh: BinaryIO) -> None:
    with src.open("rb") as source:
        shutil.copyfileobj(source, fh, MB)


def check_matches(header: Header, checked: CheckedFile, expected: Expected | None) -> None:
    """The dataset must be what its request and presentation context announced."""
    if expected is None:
        return
    context = expected.sop_class_uid
    if expected.request_sop_class_uid not in (None, context):
        raise SOPClassMismatchError(
            f"request's SOP Class {expected.request_sop_class_uid} differs from its "
            f"presentation context's {context}"
        )
    if header.sop_class_uid != context:
        raise SOPClassMismatchError(
            f"dataset SOP Class {header.sop_class_uid} differs from its presentation "
            f"context's {context}"
        )
    if checked.transfer_syntax_uid != expected.transfer_syntax_uid:
        raise InvalidDatasetError(
            f"file meta transfer syntax {checked.transfer_syntax_uid} differs from the "
            f"negotiated {expected.transfer_syntax_uid}"
        )


class Store:
    """Writes received instances under ``root`` and indexes them through ``sessions``.

    Thread-safe: the SCP calls :meth:`store_received` from one thread per association. File
    fsyncs run concurrently with the check of the same instance; the index
    check-rename-commit step is serialised.
    """

    def __init__(
        self,
        root: Path,
        sessions: sessionmaker[Session],
        min_free_mb: int,
        *,
        max_instance_mb: int = DEFAULT_MAX_INSTANCE_MB,
        max_rows_columns: int = DEFAULT_MAX_ROWS_COLUMNS,
        sweep_staging: bool = True,
    ) -> None:
        """Store under ``root`` (created if missing), refusing when free space < min_free_mb.

        ``sweep_staging``: delete staged files a crash left (only the process that receives
        may: another one would delete transfers in progress).
        """
        self.root = root
        self._sessions = sessions
        self.min_free_mb = min_free_mb
        self.max_instance_mb = max_instance_mb
        self.limits = PixelLimits(max_rows_columns)
        self.guard = IndexFileGuard.for_sessions(sessions)
        self._lock = threading.Lock()
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-fsync")
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-write")
        self.staging = root / STAGING_DIR
        try:
            make_dirs(self.staging)
        except OSError as exc:
            raise _os_error("cannot create storage folder", root, exc) from exc
        for pattern in STAGED_PATTERNS if sweep_staging else ():  # never acknowledged
            for stale in self.staging.glob(pattern):
                unlink_quietly(stale)

    @classmethod
    def from_config(
        cls, storage: StorageSection, sessions: sessionmaker[Session], *, sweep_staging: bool = True
    ) -> Store:
        """A store with the limits of the ``storage`` config section."""
        return cls(
            storage.root,
            sessions,
            storage.min_free_mb,
            max_instance_mb=storage.max_instance_mb,
            max_rows_columns=storage.max_rows_columns,
            sweep_staging=sweep_staging,
        )

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions on the index this store writes to."""
        return self._sessions

    def reconfigure(self, storage: StorageSection) -> None:
        """Apply reloaded limits (the root needs a restart)."""
        self.min_free_mb = storage.min_free_mb
        self.max_instance_mb = storage.max_instance_mb
        self.limits = PixelLimits(storage.max_rows_columns)

    def close(self) -> None:
        """Release the helper threads (the store is unusable afterwards)."""
        self._writer.shutdown(wait=True)
        self._syncer.shutdown(wait=True)

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Absolute paths of a series' stored files, in slice (then instance number) order."""
        return series_paths(self._sessions, self.root, series_uid)

    # -- the public writes ---------------------------------------------------------------
    def store_received(
        self, staged: Path, *, expected: Expected | None, calling_aet: str, peer: str
    ) -> StoredInstance:
        """Durably store and index the Part-10 file ``staged`` (in :attr:`staging`); raise a
        NodeError when it cannot be read in full, does not match ``expected`` or cannot be
        stored. On success the file has been renamed away; on failure the caller removes it."""
        size = staged.stat().st_size
        if size > self.max_instance_mb * MB:
            raise InstanceTooLargeError(
                f"instance is {size / MB:.0f} MB, above storage.max_instance_mb "
                f"{self.max_instance_mb}"
            )
        self._check_free_space(0)
        self.guard.check()
        synced = self._writer.submit(fsync_file, staged)
        try:
            checked = check_file(
                staged,
                limits=self.limits,
                transfer_syntax=None if expected is None else expected.transfer_syntax_uid,
            )
            header = parse_header(staged)
            check_matches(header, checked, expected)
            rel = Path(header.study_uid) / header.series_uid / f"{header.sop_instance_uid}.dcm"
            self._ensure_dir((self.root / rel).parent)
        finally:
            sync_error = synced.exception()
        if isinstance(sync_error, OSError):
            raise _os_error("cannot sync", staged, sync_error) from sync_error
        received = _Received(header, checked, staged, rel, calling_aet, peer)
        with self._lock:
            return self._index_and_place(received)

    def store_encoded(
        self,
        encoded: bytes,
        *,
        calling_aet: str,
        peer: str,
        expected: Expected | None = None,
    ) -> StoredInstance:
        """Durably store and index Part-10 ``encoded`` bytes (see :meth:`store_received`)."""
        if len(encoded) > self.max_instance_mb * MB:
            raise InstanceTooLargeError(
                f"instance is {len(encoded) / MB:.0f} MB, above storage.max_instance_mb "
                f"{self.max_instance_mb}"
            )
        self._check_free_space(len(encoded))
        staged = self._write_staged(encoded)
        try:
            return self.store_received(
                staged, expected=expected, calling_aet=calling_aet, peer=peer
            )
        finally:
            unlink_quietly(staged)  # normally already renamed away

    def adopt(self, path: Path, *, calling_aet: str) -> StoredInstance:
        """Index a file already at its final place (a crash between its rename and the
        commit, or an index being rebuilt); an existing row of the instance is replaced."""
        checked = check_file(path, limits=self.limits)
        header = parse_header(path)
        rel = Path(header.study_uid) / header.series_uid / f"{header.sop_instance_uid}.dcm"
        if self.root / rel != path:
            raise InvalidDatasetError(f"{path} holds instance {rel}: not where it belongs")
        rx = _Received(header, checked, path, rel, calling_aet, "(storage)")
        with self._lock, self._sessions() as session:
            existing = index.existing_instance(session, header.sop_instance_uid)
            if existing is not None:
                if self._same_content(rx, existing) and existing.path == rel.as_posix():
                    return rx.stored(path, checked.size, duplicate=True)
                index.remove_instance(session, header.sop_instance_uid)
                session.flush()
            self._insert(session, rx)
            self.guard.check()
            session.commit()
            self.guard.check()
        return rx.stored(path, checked.size, duplicate=False, replaced=existing is not None)

    # -- helpers -------------------------------------------------------------------------
    def _check_free_space(self, incoming: int) -> None:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise _os_error("cannot check free space of", self.root, exc) from exc
        if free - incoming < self.min_free_mb * MB:
            raise StorageFullError(
                f"free space on {self.root} is {free // MB} MB, below the floor of "
                f"storage.min_free_mb = {self.min_free_mb} MB"
            )

    def _ensure_dir(self, path: Path) -> None:
        try:
            make_dirs(path, stop_at=self.root)
        except OSError as exc:
            raise _os_error("cannot create folder", path, exc) from exc

    def _write_staged(self, encoded: bytes) -> Path:
        """Write ``encoded`` to a new temporary file in the staging folder."""
        tmp = temporary_name(self.staging / "incoming")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            raise _os_error("cannot create", tmp, exc) from exc
        try:
            view = memoryview(encoded)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            os.close(fd)
            unlink_quietly(tmp)
            raise _os_error("cannot write", tmp, exc) from exc
        os.close(fd)
        return tmp

    def _index_and_place(self, rx: _Received) -> StoredInstance:
        """Check for duplicates, insert the row, rename the file in, commit (all or nothing)."""
        final = self.root / rx.rel
        placed = False
        replaced: Path | None = None
        try:
            # Explicit commit below; leaving the block without it rolls back (read-only paths).
            with self._sessions() as session:
                existing = index.existing_instance(session, rx.header.sop_instance_uid)
                if existing is not None:
                    if self._same_content(rx, existing):
                        return self._unchanged(rx, existing)
                    replaced = self._replaceable(rx, existing)
                    index.remove_instance(session, rx.header.sop_instance_uid)
                    session.flush()
                self._insert(session, rx)
                self._place(rx.staged, final)
                placed = True
                self._commit_and_sync(session, rx.header.sop_instance_uid, final)
        except SQLAlchemyError as exc:
            if placed:
                unlink_quietly(final)
            log.error("index insert for %s failed: %s", rx.header.sop_instance_uid, exc)
            raise StorageError(f"index insert failed: {type(exc).__name__}") from exc
        except BaseException:
            if placed:
                unlink_quietly(final)
            raise
        if replaced is not None and replaced != final:
            unlink_quietly(replaced)
        return rx.stored(final, rx.checked.size, duplicate=False, replaced=replaced is not None)

    def _insert(self, session: Session, rx: _Received) -> None:
        now = utcnow()
        series_pk = index.series_pk_for(session, rx.header, rx.calling_aet, now)
        index.insert_instance(
            session,
            rx.header,
            series_pk=series_pk,
            rel_path=rx.rel,
            size=rx.checked.size,
            digest=rx.checked.sha256,
            calling_aet=rx.calling_aet,
            now=now,
        )

    @staticmethod
    def _same_content(rx: _Received, existing: Any) -> bool:
        return bool(
            existing.sha256 == rx.checked.sha256
            and existing.transfer_syntax_uid == rx.header.transfer_syntax_uid
        )

    def _unchanged(self, rx: _Received, existing: Any) -> StoredInstance:
        """An identical re-send is a no-op success (restoring the file if it vanished)."""
        known = self.root / existing.path
        try:
            intact = known.stat().st_size == existing.size
        except FileNotFoundError:
            intact = False
        if not intact:  # indexed file vanished or was damaged: put the re-sent copy back
            log.warning(
                "instance %s: stored file missing or damaged, restored from a re-send",
                rx.header.sop_instance_uid,
            )
            self._place(rx.staged, known)
            fsync_dir(known.parent)
        log.debug("instance %s re-sent unchanged: no-op", rx.header.sop_instance_uid)
        return rx.stored(known, existing.size, duplicate=True)

    def _replaceable(self, rx: _Received, existing: Any) -> Path:
        """The stored copy's path if it cannot be read (so the re-send replaces it); else
        refuse the re-send as a conflict."""
        uid = rx.header.sop_instance_uid
        known: Path = self.root / str(existing.path)
        problem = self.unreadable(known)
        if problem is None:
            log.warning(
                "refused instance %s from %s (%s): same SOPInstanceUID as a stored "
                "instance but different content or transfer syntax; kept the first",
                uid,
                rx.calling_aet,
                rx.peer,
            )
            raise ConflictingInstanceError(f"instance {uid} already stored with different content")
        log.warning(
            "instance %s re-sent by %s (%s) replaces its stored copy, which cannot be read: %s",
            uid,
            rx.calling_aet,
            rx.peer,
            problem,
        )
        return known

    def unreadable(self, path: Path) -> str | None:
        """Why the stored file ``path`` cannot be read in full (None when it can)."""
        try:
            check_file(path, limits=self.limits)
        except FileNotFoundError:
            return "the file is missing"
        except NodeError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read it: {exc.strerror or exc}"
        return None

    @staticmethod
    def _place(tmp: Path, final: Path) -> None:
        try:
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise _os_error("cannot place", final, exc) from exc
        else:
            return
        # a received file made on another disk (not the staging folder): copy it over
        try:
            write_durably(final, lambda fh: _copy_into(tmp, fh))
        except OSError as exc:
            raise _os_error("cannot place", final, exc) from exc

    def _commit_and_sync(self, session: Session, sop_instance_uid: str, final: Path) -> None:
        """Commit the row while the folder fsync makes the rename durable; both, or neither.

        The two each wait for the disk: run them at the same time, acknowledge only after both.
        The index file is checked before and after the commit: a row committed into a deleted
        or replaced index file would be lost, so that instance is refused instead.
        """
        self.guard.check()
        dir_sync = self._syncer.submit(fsync_dir, final.parent)
        try:
            session.commit()
        finally:
            dir_error = dir_sync.exception()
        self.guard.check()
        if dir_error is not None:
            self._unindex(sop_instance_uid)
            if isinstance(dir_error, OSError):
                raise _os_error("cannot sync folder of", final, dir_error) from dir_error
            raise dir_error

    def _unindex(self, sop_instance_uid: str) -> None:
        """Remove a just-committed instance row again (its file could not be made durable)."""
        try:
            with self._sessions() as session, session.begin():
                index.remove_instance(session, sop_instance_uid)
        except SQLAlchemyError as exc:
            log.error("could not remove the index row of %s: %s", sop_instance_uid, exc)
