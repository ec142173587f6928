"""Atomic storage of received instances and their index rows.

``storage.root/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` holds the bytes exactly as received
(preamble + file meta + the peer's dataset encoding, never re-encoded). A file is written to a
temporary name in its final folder, fsynced, renamed into place and the folder fsynced; the index
row is committed after the rename, and the file is removed again if the commit fails, so an
instance is never reported stored without being durable *and* indexed.

Duplicate policy (patient safety first):
- same SOPInstanceUID, same dataset bytes (SHA-256 of everything after the file meta) and same
  transfer syntax: no-op success (a re-send, possibly from another AE);
- same SOPInstanceUID with different content or transfer syntax: refused
  (:class:`ConflictingInstanceError`, DIMSE 0xA900), the first instance is kept, a warning logged;
- an instance whose Study or Series UID is already indexed under a different patient / study:
  refused the same way (mixing two patients' images is never silently accepted).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import struct
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import (
    ConflictingInstanceError,
    InvalidDatasetError,
    InvalidUIDError,
    NodeError,
    SOPClassMismatchError,
    StorageError,
    StorageFullError,
)
from dicom_node.models import Instance, Patient, Series, Study, utcnow

log = logging.getLogger(__name__)

# Digits and single dots only: no empty component, so never '', '.', '..' or a separator.
# Leading zeros in a component are tolerated (invalid per PS3.5 but common and path-safe).
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LEN = 64
_MB = 1024 * 1024


STAGING_DIR = ".incoming"
"""Folder below the storage root where received bytes are written before their rename."""


def safe_uid(uid: object) -> str:
    """Return ``uid`` (stripped of padding) if it is a valid DICOM UID usable as a path part."""
    if not isinstance(uid, str):
        raise InvalidUIDError(f"UID must be a string, got {type(uid).__name__}")
    value = uid.strip(" \x00")
    if not value or len(value) > MAX_UID_LEN or not _UID_RE.match(value):
        raise InvalidUIDError(f"invalid UID {value[:80]!r}")
    return value


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


@dataclass(frozen=True)
class _Header:
    """The attributes the index needs, parsed from the received header."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    attrs: dict[str, Any]


def dataset_offset(encoded: bytes) -> int:
    """Offset of the dataset in Part-10 bytes (after preamble, 'DICM' and the file meta)."""
    if len(encoded) < 144 or encoded[128:132] != b"DICM":
        raise InvalidDatasetError("not DICOM Part-10 bytes (no 'DICM' prefix)")
    tag_group, tag_elem = struct.unpack("<HH", encoded[132:136])
    if (tag_group, tag_elem) != (0x0002, 0x0000) or encoded[136:138] != b"UL":
        raise InvalidDatasetError("file meta has no group length element")
    (group_len,) = struct.unpack("<I", encoded[140:144])
    offset = 144 + int(group_len)
    if offset > len(encoded):
        raise InvalidDatasetError("file meta group length exceeds the data")
    return offset


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(str(value))
    except (TypeError, ValueError):
        return None


def _orientation(ds: Dataset) -> list[float] | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        try:  # enhanced multi-frame: shared functional groups
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 6 else None


def _slice_position(ds: Dataset, iop: list[float] | None) -> tuple[str | None, float | None]:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None:
        return None, None
    try:
        pos = [float(v) for v in ipp]
    except (TypeError, ValueError):
        return None, None
    if len(pos) != 3:
        return None, None
    text = "\\".join(f"{v:g}" for v in pos)
    if iop is None:
        return text, None
    r, c = iop[:3], iop[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return text, sum(p * n for p, n in zip(pos, normal, strict=True))


def parse_header(encoded: bytes) -> _Header:
    """Parse the header of received Part-10 bytes (no pixel data); raise on anything unusable."""
    try:
        ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True)
        meta = ds.file_meta
        ts = str(meta.TransferSyntaxUID)
        meta_class = str(meta.get("MediaStorageSOPClassUID", ""))
        sop_uid_raw = ds.get("SOPInstanceUID")
        sop_class_raw = ds.get("SOPClassUID")
        study_raw = ds.get("StudyInstanceUID")
        series_raw = ds.get("SeriesInstanceUID")
        iop = _orientation(ds)
        ipp_text, slice_pos = _slice_position(ds, iop)
        attrs: dict[str, Any] = {
            "patient_id": _text(ds, "PatientID") or "",
            "issuer": _text(ds, "IssuerOfPatientID") or "",
            "patient_name": _text(ds, "PatientName", 324),
            "birth_date": _text(ds, "PatientBirthDate", 8),
            "sex": _text(ds, "PatientSex", 16),
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 16),
            "study_description": _text(ds, "StudyDescription"),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "modality": _text(ds, "Modality", 16),
            "series_description": _text(ds, "SeriesDescription"),
            "series_number": _int(ds, "SeriesNumber"),
            "series_date": _text(ds, "SeriesDate", 8),
            "series_time": _text(ds, "SeriesTime", 16),
            "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
            "image_orientation_patient": "\\".join(f"{v:g}" for v in iop) if iop else None,
            "image_type": _text(ds, "ImageType", 128),
            "instance_number": _int(ds, "InstanceNumber"),
            "image_position_patient": ipp_text,
            "slice_position": slice_pos,
            "number_of_frames": _int(ds, "NumberOfFrames"),
        }
    except InvalidDatasetError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    for name, raw in (
        ("SOPInstanceUID", sop_uid_raw),
        ("SOPClassUID", sop_class_raw),
        ("StudyInstanceUID", study_raw),
        ("SeriesInstanceUID", series_raw),
    ):
        if raw is None or str(raw).strip(" \x00") == "":
            raise InvalidDatasetError(f"dataset has no {name}")
    try:
        sop_uid = safe_uid(str(sop_uid_raw))
        sop_class = safe_uid(str(sop_class_raw))
        study_uid = safe_uid(str(study_raw))
        series_uid = safe_uid(str(series_raw))
    except InvalidUIDError as exc:
        raise InvalidUIDError(f"{exc} in dataset") from None
    meta_uid = str(meta.get("MediaStorageSOPInstanceUID", "")).strip(" \x00")
    if meta_uid and meta_uid != sop_uid:
        raise InvalidDatasetError(
            f"SOPInstanceUID {sop_uid} differs from the request's affected instance {meta_uid}"
        )
    if meta_class and meta_class.strip(" \x00") != sop_class:
        raise SOPClassMismatchError(
            f"dataset SOPClassUID {sop_class} differs from the negotiated class {meta_class}"
        )
    return _Header(sop_uid, sop_class, study_uid, series_uid, ts, attrs)


# Index statements of the C-STORE path, built once (building them costs more than running them).
_SELECT_INSTANCE = select(
    Instance.sha256, Instance.transfer_syntax_uid, Instance.path, Instance.size
).where(Instance.sop_instance_uid == bindparam("uid"))
_SELECT_SERIES = (
    select(Series.id, Study.study_instance_uid, Patient.patient_id, Patient.issuer_of_patient_id)
    .join(Study, Series.study_pk == Study.id)
    .join(Patient, Study.patient_pk == Patient.id)
    .where(Series.series_instance_uid == bindparam("uid"))
)
_INSERT_INSTANCE = insert(Instance)
_COUNT_INSTANCE = (
    update(Series)
    .where(Series.id == bindparam("pk"))
    .values(number_of_instances=Series.number_of_instances + 1, last_received_at=bindparam("now"))
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)


def _os_error(action: str, path: Path, exc: OSError) -> NodeError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
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
            root.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir(exist_ok=True)
        except OSError as exc:
            raise _os_error("cannot create storage folder", root, exc) from exc
        for stale in self.staging.glob("*.tmp"):  # left by a crash: never acknowledged
            _unlink_quietly(stale)

    def close(self) -> None:
        """Release the helper threads (the store is unusable afterwards)."""
        self._writer.shutdown(wait=True)
        self._syncer.shutdown(wait=True)

    def _unindex(self, sop_instance_uid: str) -> None:
        """Remove a just-committed instance row again (its file could not be made durable)."""
        try:
            with self._sessions() as session, session.begin():
                inst = session.scalar(
                    select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
                )
                if inst is not None:
                    inst.series.number_of_instances -= 1
                    session.delete(inst)
        except SQLAlchemyError as exc:
            log.error("could not remove the index row of %s: %s", sop_instance_uid, exc)

    # -- helpers -----------------------------------------------------------------------
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
        """Create ``path`` below root, fsyncing each parent whose entries changed."""
        missing: list[Path] = []
        p = path
        while not p.is_dir() and p != self.root:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir(exist_ok=True)
                _fsync_dir(d.parent)
            except OSError as exc:
                raise _os_error("cannot create folder", d, exc) from exc

    def _write_tmp(self, folder: Path, sop_uid: str, encoded: bytes) -> Path:
        tmp = folder / f".{sop_uid}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise _os_error("cannot create", tmp, exc) from exc
        try:
            view = memoryview(encoded)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(tmp)
            raise _os_error("cannot write", tmp, exc) from exc
        os.close(fd)
        return tmp

    # -- the one public write ------------------------------------------------------------
    def store_encoded(self, encoded: bytes, *, calling_aet: str, peer: str) -> StoredInstance:
        """Durably store and index Part-10 ``encoded`` bytes; raise a NodeError on failure."""
        self._check_free_space(len(encoded))
        # The bytes are written and fsynced to a temporary file in the staging folder on a
        # helper thread while this thread parses the header, hashes the bytes and looks the
        # instance up in the index; nothing is renamed into place (and no Success is
        # possible) before that fsync has returned.
        written = self._writer.submit(self._write_tmp, self.staging, "incoming", encoded)
        try:
            header = parse_header(encoded)
            rel = Path(header.study_uid) / header.series_uid / f"{header.sop_instance_uid}.dcm"
            final = self.root / rel
            self._ensure_dir(final.parent)
            digest = hashlib.sha256(memoryview(encoded)[dataset_offset(encoded) :]).hexdigest()
            with self._lock:
                return self._index_and_place(
                    header, digest, len(encoded), written, final, rel, calling_aet, peer
                )
        finally:
            if written.exception() is None:
                _unlink_quietly(written.result())  # normally already renamed away

    def _index_and_place(
        self,
        header: _Header,
        digest: str,
        size: int,
        written: Future[Path],
        final: Path,
        rel: Path,
        calling_aet: str,
        peer: str,
    ) -> StoredInstance:
        a = header.attrs
        now = utcnow()
        result = StoredInstance(
            header.sop_instance_uid,
            header.sop_class_uid,
            header.series_uid,
            header.study_uid,
            final,
            size,
            digest,
            duplicate=False,
        )
        placed = False
        try:
            # Explicit commit below; leaving the block without it rolls back (read-only paths).
            with self._sessions() as session:
                conn = session.connection()
                existing = conn.execute(_SELECT_INSTANCE, {"uid": header.sop_instance_uid}).first()
                if existing is not None:
                    if (
                        existing.sha256 == digest
                        and existing.transfer_syntax_uid == header.transfer_syntax_uid
                    ):
                        known = self.root / existing.path
                        if not known.exists():  # indexed file vanished: put it back
                            os.replace(written.result(), known)
                            _fsync_dir(known.parent)
                        log.debug("instance %s re-sent unchanged: no-op", header.sop_instance_uid)
                        return StoredInstance(
                            result.sop_instance_uid,
                            result.sop_class_uid,
                            result.series_instance_uid,
                            result.study_instance_uid,
                            known,
                            existing.size,
                            digest,
                            duplicate=True,
                        )
                    log.warning(
                        "refused instance %s from %s (%s): same SOPInstanceUID as a stored "
                        "instance but different content or transfer syntax; kept the first",
                        header.sop_instance_uid,
                        calling_aet,
                        peer,
                    )
                    raise ConflictingInstanceError(
                        f"instance {header.sop_instance_uid} already stored with different content"
                    )

                # The common case (a further instance of a known series) is one joined look-up,
                # one INSERT and one UPDATE through the connection, without the ORM's unit of
                # work; the first instance of a series creates its rows through the ORM.
                series_pk = self._known_series(session, header)
                if series_pk is None:
                    series_pk = self._series_for(session, header, calling_aet, now).id
                conn.execute(
                    _INSERT_INSTANCE,
                    {
                        "sop_instance_uid": header.sop_instance_uid,
                        "series_pk": series_pk,
                        "sop_class_uid": header.sop_class_uid,
                        "transfer_syntax_uid": header.transfer_syntax_uid,
                        "path": rel.as_posix(),
                        "size": size,
                        "sha256": digest,
                        "instance_number": a["instance_number"],
                        "image_position_patient": a["image_position_patient"],
                        "slice_position": a["slice_position"],
                        "number_of_frames": a["number_of_frames"],
                        "received_at": now,
                        "calling_aet": calling_aet,
                    },
                )
                conn.execute(_COUNT_INSTANCE, {"pk": series_pk, "now": now})
                tmp = written.result()  # durable temporary file (raises if writing failed)
                try:
                    os.replace(tmp, final)
                except OSError as exc:
                    raise _os_error("cannot place", final, exc) from exc
                placed = True
                # The folder fsync (making the rename durable) and the index commit each wait
                # for the disk: run them at the same time, acknowledge only after both. A crash
                # in between can leave a committed row whose file is missing; the sender got
                # no Success and re-sends, and the re-send restores the file (see above).
                dir_sync = self._syncer.submit(_fsync_dir, final.parent)
                try:
                    session.commit()
                finally:
                    dir_error = dir_sync.exception()
                if dir_error is not None:
                    self._unindex(header.sop_instance_uid)
                    if isinstance(dir_error, OSError):
                        raise _os_error("cannot sync folder of", final, dir_error) from dir_error
                    raise dir_error
        except SQLAlchemyError as exc:
            if placed:
                _unlink_quietly(final)
            log.error("index insert for %s failed: %s", header.sop_instance_uid, exc)
            raise StorageError(f"index insert failed: {type(exc).__name__}") from exc
        except BaseException:
            if placed:
                _unlink_quietly(final)
            raise
        return result

    def _known_series(self, session: Session, header: _Header) -> int | None:
        """Primary key of the header's series if indexed (None if new); refuse mixing."""
        a = header.attrs
        row = session.connection().execute(_SELECT_SERIES, {"uid": header.series_uid}).first()
        if row is None:
            return None
        if row.study_instance_uid != header.study_uid:
            raise _conflict(header, "series", header.series_uid, "study")
        if (row.patient_id, row.issuer_of_patient_id) != (a["patient_id"], a["issuer"]):
            raise _conflict(header, "study", header.study_uid, "patient")
        return int(row.id)

    def _series_for(
        self, session: Session, header: _Header, calling_aet: str, now: datetime
    ) -> Series:
        """Find or create patient, study and series rows; refuse cross-patient mixing."""
        a = header.attrs
        patient = session.scalar(
            select(Patient).where(
                Patient.patient_id == a["patient_id"],
                Patient.issuer_of_patient_id == a["issuer"],
            )
        )
        if patient is None:
            patient = Patient(
                patient_id=a["patient_id"],
                issuer_of_patient_id=a["issuer"],
                patient_name=a["patient_name"],
                birth_date=a["birth_date"],
                sex=a["sex"],
            )
            session.add(patient)
        study = session.scalar(select(Study).where(Study.study_instance_uid == header.study_uid))
        if study is None:
            study = Study(
                study_instance_uid=header.study_uid,
                patient=patient,
                study_date=a["study_date"],
                study_time=a["study_time"],
                study_description=a["study_description"],
                accession_number=a["accession_number"],
            )
            session.add(study)
        elif study.patient is not patient:
            raise _conflict(header, "study", header.study_uid, "patient")
        series = session.scalar(
            select(Series).where(Series.series_instance_uid == header.series_uid)
        )
        if series is None:
            series = Series(
                series_instance_uid=header.series_uid,
                study=study,
                modality=a["modality"],
                series_description=a["series_description"],
                series_number=a["series_number"],
                series_date=a["series_date"],
                series_time=a["series_time"],
                frame_of_reference_uid=a["frame_of_reference_uid"],
                image_orientation_patient=a["image_orientation_patient"],
                sop_class_uid=header.sop_class_uid,
                image_type=a["image_type"],
                number_of_instances=0,
                first_received_at=now,
                last_received_at=now,
                calling_aet=calling_aet,
                state="receiving",
            )
            session.add(series)
            session.flush()  # assigns series.id
        elif series.study is not study:
            raise _conflict(header, "series", header.series_uid, "study")
        return series

    # -- reading -------------------------------------------------------------------------
    def instance_paths(self, series_uid: str) -> list[Path]:
        """Absolute paths of a series' stored files, in slice (then instance number) order."""
        uid = safe_uid(series_uid)
        with self._sessions() as session:
            rows = list(
                session.execute(
                    select(Instance.path, Instance.slice_position, Instance.instance_number)
                    .join(Series)
                    .where(Series.series_instance_uid == uid)
                ).all()
            )
        rows.sort(
            key=lambda r: (
                r.slice_position is None,
                r.slice_position or 0.0,
                r.instance_number or 0,
                r.path,
            )
        )
        return [self.root / r.path for r in rows]


def _conflict(header: _Header, kind: str, uid: str, owner: str) -> ConflictingInstanceError:
    """Log and build the refusal of an instance whose series or study belongs elsewhere."""
    log.warning(
        "refused instance %s: %s %s is indexed under another %s",
        header.sop_instance_uid,
        kind,
        uid,
        owner,
    )
    return ConflictingInstanceError(f"{kind} {uid} already belongs to a different {owner}")
