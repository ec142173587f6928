"""Atomic storage of received instances and their index rows.

``storage.root/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` holds the bytes exactly as received
(preamble + file meta + the peer's dataset encoding, never re-encoded). The bytes are written to
a temporary file in the staging folder and fsynced, renamed into place and the folder fsynced;
the index row is committed after the rename, and the file is removed again if the commit fails,
so an instance is never reported stored without being durable *and* indexed.

Duplicate policy (patient safety first):
- same SOPInstanceUID, same dataset bytes (SHA-256 of everything after the file meta) and same
  transfer syntax: no-op success (a re-send, possibly from another AE);
- same SOPInstanceUID with different content or transfer syntax: refused
  (:class:`ConflictingInstanceError`, DIMSE 0xA900), the first instance is kept, a warning logged;
- an instance whose Study or Series UID is already indexed under a different patient / study:
  refused the same way (mixing two patients' images is never silently accepted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import (
    ConflictingInstanceError,
    NodeError,
    StorageError,
    StorageFullError,
)
from dicom_node.models import utcnow
from dicom_node.storage import index
from dicom_node.storage.fsutil import (
    FILE_MODE,
    fsync_dir,
    is_disk_full,
    make_dirs,
    temporary_name,
    unlink_quietly,
)
from dicom_node.storage.header import Header, dataset_offset, parse_header
from dicom_node.storage.index import series_paths

__all__ = ["STAGING_DIR", "Store", "StoredInstance", "series_paths"]

log = logging.getLogger(__name__)

_MB = 1024 * 1024

STAGING_DIR = ".incoming"
"""Folder below the storage root where received bytes are written before their rename."""


@dataclass(frozen=True)
class StoredInstance:
    """What :meth:`Store.store_encoded` did with one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: Path
    size: int
    sha256: str
    duplicate: bool
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    """The patient, for the audit trail (which keeps only a keyed hash of it)."""


@dataclass(frozen=True)
class _Received:
    """One received instance on its way into the store."""

    header: Header
    digest: str
    size: int
    written: Future[Path]
    rel: Path
    calling_aet: str
    peer: str

    def stored(self, path: Path, size: int, *, duplicate: bool) -> StoredInstance:
        h = self.header
        return StoredInstance(
            h.sop_instance_uid,
            h.sop_class_uid,
            h.series_uid,
            h.study_uid,
            path,
            size,
            self.digest,
            duplicate=duplicate,
            patient_id=h.patient.patient_id,
            issuer_of_patient_id=h.patient.issuer,
        )


def _os_error(action: str, path: Path, exc: OSError) -> NodeError:
    if is_disk_full(exc):
        return StorageFullError(f"{action} {path}: no space left on device")
    return StorageError(f"{action} {path}: {exc.strerror or exc}")


class Store:
    """Writes received instances under ``root`` and indexes them through ``sessions``.

    Thread-safe: the SCP calls :meth:`store_encoded` from one thread per association. File
    writes and fsyncs run concurrently (with each other, with hashing and with the index
    look-ups of the same instance); the index check-rename-commit step is serialised.
    """

    def __init__(self, root: Path, sessions: sessionmaker[Session], min_free_mb: int) -> None:
        """Store under ``root`` (created if missing), refusing when free space < min_free_mb."""
        self.root = root
        self._sessions = sessions
        self.min_free_mb = min_free_mb
        self._lock = threading.Lock()
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-fsync")
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-write")
        self.staging = root / STAGING_DIR
        try:
            make_dirs(self.staging)
        except OSError as exc:
            raise _os_error("cannot create storage folder", root, exc) from exc
        for stale in self.staging.glob("*.tmp"):  # left by a crash: never acknowledged
            unlink_quietly(stale)

    def close(self) -> None:
        """Release the helper threads (the store is unusable afterwards)."""
        self._writer.shutdown(wait=True)
        self._syncer.shutdown(wait=True)

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Absolute paths of a series' stored files, in slice (then instance number) order."""
        return series_paths(self._sessions, self.root, series_uid)

    # -- the one public write ------------------------------------------------------------
    def store_encoded(self, encoded: bytes, *, calling_aet: str, peer: str) -> StoredInstance:
        """Durably store and index Part-10 ``encoded`` bytes; raise a NodeError on failure."""
        self._check_free_space(len(encoded))
        # The bytes are written and fsynced to a temporary file in the staging folder on a
        # helper thread while this thread parses the header, hashes the bytes and looks the
        # instance up in the index; nothing is renamed into place (and no Success is
        # possible) before that fsync has returned.
        written = self._writer.submit(self._write_staged, encoded)
        try:
            header = parse_header(encoded)
            rel = Path(header.study_uid) / header.series_uid / f"{header.sop_instance_uid}.dcm"
            self._ensure_dir((self.root / rel).parent)
            digest = hashlib.sha256(memoryview(encoded)[dataset_offset(encoded) :]).hexdigest()
            received = _Received(header, digest, len(encoded), written, rel, calling_aet, peer)
            with self._lock:
                return self._index_and_place(received)
        finally:
            if written.exception() is None:
                unlink_quietly(written.result())  # normally already renamed away

    # -- helpers -------------------------------------------------------------------------
    def _check_free_space(self, incoming: int) -> None:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise _os_error("cannot check free space of", self.root, exc) from exc
        if free - incoming < self.min_free_mb * _MB:
            raise StorageFullError(
                f"free space on {self.root} is {free // _MB} MB, below the floor of "
                f"storage.min_free_mb = {self.min_free_mb} MB"
            )

    def _ensure_dir(self, path: Path) -> None:
        try:
            make_dirs(path, stop_at=self.root)
        except OSError as exc:
            raise _os_error("cannot create folder", path, exc) from exc

    def _write_staged(self, encoded: bytes) -> Path:
        """Write and fsync ``encoded`` to a new temporary file in the staging folder."""
        tmp = temporary_name(self.staging / "incoming")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            raise _os_error("cannot create", tmp, exc) from exc
        try:
            view = memoryview(encoded)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
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
        try:
            # Explicit commit below; leaving the block without it rolls back (read-only paths).
            with self._sessions() as session:
                existing = index.existing_instance(session, rx.header.sop_instance_uid)
                if existing is not None:
                    return self._duplicate(rx, existing)
                now = utcnow()
                series_pk = index.series_pk_for(session, rx.header, rx.calling_aet, now)
                index.insert_instance(
                    session,
                    rx.header,
                    series_pk=series_pk,
                    rel_path=rx.rel,
                    size=rx.size,
                    digest=rx.digest,
                    calling_aet=rx.calling_aet,
                    now=now,
                )
                self._place(rx.written.result(), final)
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
        return rx.stored(final, rx.size, duplicate=False)

    def _duplicate(self, rx: _Received, existing: Any) -> StoredInstance:
        """An identical re-send is a no-op success; different content is refused."""
        uid = rx.header.sop_instance_uid
        if (
            existing.sha256 == rx.digest
            and existing.transfer_syntax_uid == rx.header.transfer_syntax_uid
        ):
            known = self.root / existing.path
            if not known.exists():  # indexed file vanished: put it back
                self._place(rx.written.result(), known)
                fsync_dir(known.parent)
            log.debug("instance %s re-sent unchanged: no-op", uid)
            return rx.stored(known, existing.size, duplicate=True)
        log.warning(
            "refused instance %s from %s (%s): same SOPInstanceUID as a stored "
            "instance but different content or transfer syntax; kept the first",
            uid,
            rx.calling_aet,
            rx.peer,
        )
        raise ConflictingInstanceError(f"instance {uid} already stored with different content")

    @staticmethod
    def _place(tmp: Path, final: Path) -> None:
        try:
            os.replace(tmp, final)
        except OSError as exc:
            raise _os_error("cannot place", final, exc) from exc

    def _commit_and_sync(self, session: Session, sop_instance_uid: str, final: Path) -> None:
        """Commit the row while the folder fsync makes the rename durable; both, or neither.

        The two each wait for the disk: run them at the same time, acknowledge only after both.
        A crash in between can leave a committed row whose file is missing; the sender got no
        Success and re-sends, and the re-send restores the file (see :meth:`_duplicate`).
        """
        dir_sync = self._syncer.submit(fsync_dir, final.parent)
        try:
            session.commit()
        finally:
            dir_error = dir_sync.exception()
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
