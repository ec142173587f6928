"""The audit trail: who sent what, who changed what, as append-only JSON lines.

Each record is one line of JSON modelled on the IHE ATNA / DICOM PS3.15 A.5 audit message
(EventIdentification, ActiveParticipant, ParticipantObjectIdentification, AuditSource), with
coded event IDs and types from the DCM scheme; the format is documented in docs/audit.md.
Records go to ``audit.file`` (default ``<storage.root>/audit/audit.jsonl``, owner-only) and,
when ``audit.syslog`` is set, to a syslog collector as RFC 5424 messages as well.

* **No patient names, ever.** A patient ID appears only where ATNA requires a patient
  participant (instances transferred, a job's procedure record), and then only as a keyed
  hash (HMAC-SHA256 with a per-installation secret, created on first use, owner-only): an
  auditor can match records of one patient without the log revealing the ID, and without the
  key nobody can find an ID by hashing every possible one.
* **Append-only and tamper-evident.** Lines are appended under an exclusive lock (several
  processes write one file) and fsynced; each carries ``prev``, the SHA-256 of the line
  before it, so an edited or deleted line breaks the chain (:func:`verify_log`).
* **Never in the way.** A failing audit write is logged as an ERROR and the DICOM work goes on;
  syslog is sent from a background thread.

The API is small: ``audit.trail(config)`` gives the process's :class:`AuditTrail` for a config,
whose methods each write one kind of record; :func:`job_action` is the one-line call for
admin actions on jobs.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

from dicom_node.audit_log import Verification, line_digest, read_log, verify_log
from dicom_node.audit_syslog import SyslogSender
from dicom_node.config import NodeConfig
from dicom_node.config_security import SyslogSection
from dicom_node.config_watcher import ConfigChange
from dicom_node.states import AuditEvent, JobAction

__all__ = [
    "AuditTrail",
    "Verification",
    "flush_all",
    "job_action",
    "line_digest",
    "read_log",
    "trail",
    "verify_log",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TAIL_READ = 65_536
"""Bytes read from the end of the log to find the previous line (records are far shorter)."""
KEY_BYTES = 32
PATIENT_HASH_PREFIX = "hmac-sha256:"


class Outcome(IntEnum):
    """EventOutcomeIndicator of PS3.15 A.5.1."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class Code(NamedTuple):
    """A coded value of the DCM scheme (PS3.16)."""

    value: str
    meaning: str

    def as_json(self) -> dict[str, str]:
        """``{"code", "scheme", "meaning"}``."""
        return {"code": self.value, "scheme": "DCM", "meaning": self.meaning}


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
PROCEDURE_RECORD = Code("110111", "Procedure Record")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")

EVENTS: dict[AuditEvent, tuple[Code, Code | None, str]] = {
    AuditEvent.APPLICATION_START: (APPLICATION_ACTIVITY, Code("110120", "Application Start"), "E"),
    AuditEvent.APPLICATION_STOP: (APPLICATION_ACTIVITY, Code("110121", "Application Stop"), "E"),
    AuditEvent.ASSOCIATION_START: (USER_AUTHENTICATION, Code("110122", "Login"), "E"),
    AuditEvent.ASSOCIATION_END: (USER_AUTHENTICATION, Code("110123", "Logout"), "E"),
    AuditEvent.NODE_AUTHENTICATION_FAILURE: (
        SECURITY_ALERT,
        Code("110126", "Node Authentication"),
        "E",
    ),
    AuditEvent.INSTANCES_RECEIVED: (INSTANCES_TRANSFERRED, None, "C"),
    AuditEvent.INSTANCES_SENT: (INSTANCES_TRANSFERRED, None, "C"),
    AuditEvent.CONFIG_CHANGE: (SECURITY_ALERT, Code("110128", "Network Configuration"), "E"),
    AuditEvent.CERTIFICATE_CHANGE: (SECURITY_ALERT, Code("110129", "Security Configuration"), "E"),
    AuditEvent.JOB_ACTION: (PROCEDURE_RECORD, None, "U"),
    AuditEvent.QUERY: (QUERY, None, "E"),
    AuditEvent.USER_LOGIN: (USER_AUTHENTICATION, Code("110122", "Login"), "E"),
    AuditEvent.USER_LOGOUT: (USER_AUTHENTICATION, Code("110123", "Logout"), "E"),
}
"""Per record kind: EventID, EventTypeCode, EventActionCode (C create, R read, U update,
E execute). For a transfer the action is the receiver's view (A.5.3.4): C when it did not hold
the instances before, R when it did (a re-send)."""


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an application (AE title) or a person (OS user)."""

    user_id: str
    requestor: bool
    role: str
    """``source``, ``destination`` (of a transfer), ``application`` or ``user``."""
    address: str | None = None
    """NetworkAccessPointID: the peer's IP address or host name."""
    port: int | None = None
    tls_subject: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The participant as written to the log (empty fields left out)."""
        out: dict[str, Any] = {"user_id": self.user_id, "requestor": self.requestor}
        out["role"] = self.role
        for key in ("address", "port", "tls_subject"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class StudyTally:
    """What one association or send moved of one study (a ParticipantObject)."""

    study_uid: str
    patient_id: str = ""
    issuer: str = ""
    sop_classes: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0


@dataclass
class Transfers:
    """Instances of an association or send, tallied per study (no patient data is logged
    from here: the patient ID is hashed when the record is written)."""

    studies: dict[str, StudyTally] = field(default_factory=dict)

    def add(
        self,
        study_uid: str,
        sop_class_uid: str,
        *,
        patient_id: str = "",
        issuer: str = "",
        duplicate: bool = False,
    ) -> None:
        """Count one instance."""
        tally = self.studies.get(study_uid)
        if tally is None:
            tally = self.studies[study_uid] = StudyTally(study_uid, patient_id, issuer)
        tally.sop_classes[sop_class_uid] += 1
        tally.duplicates += int(duplicate)

    @property
    def instances(self) -> int:
        """Instances counted over all studies."""
        return sum(sum(t.sop_classes.values()) for t in self.studies.values())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _secure_dir(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)


def load_or_create_key(path: Path) -> bytes:
    """The installation's secret for hashing patient IDs, created (owner-only) on first use.

    Creation is atomic: the key is written to a private temporary file and linked into place,
    so concurrent first uses by several processes agree on one key.
    """
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        pass
    _secure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process was first: use its key
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def _last_line(fd: int) -> bytes | None:
    """The last complete line of the open file (None when empty)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None
    start = max(0, size - TAIL_READ)
    tail = os.pread(fd, size - start, start)
    lines = tail.rstrip(b"\n").split(b"\n")
    return lines[-1] if lines and lines[-1] else None


class AuditTrail:
    """Writes audit records for one node installation (see the module docstring)."""

    def __init__(
        self,
        log_file: Path,
        key_file: Path,
        *,
        source_id: str,
        syslog: SyslogSection | None = None,
    ) -> None:
        """Write to ``log_file``; hash patient IDs with the key in ``key_file``."""
        self.log_file = log_file
        self.key_file = key_file
        self.source = {"id": source_id, "host": socket.gethostname(), "pid": os.getpid()}
        self._key: bytes | None = None
        self._lock = threading.Lock()
        self._syslog = SyslogSender(syslog) if syslog is not None else None

    # -- the generic writer ----------------------------------------------------------------
    def record(
        self,
        event: AuditEvent,
        *,
        outcome: Outcome = Outcome.SUCCESS,
        text: str = "",
        participants: Sequence[Participant] = (),
        objects: Sequence[Mapping[str, Any]] = (),
        detail: Mapping[str, Any] | None = None,
        action: str | None = None,
    ) -> dict[str, Any] | None:
        """Append one record; returns it, or None when it could not be written (logged).

        ``action`` overrides the kind's EventActionCode."""
        event_id, event_type, default_action = EVENTS[event]
        entry: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "time": _now(),
            "event": str(event),
            "event_id": event_id.as_json(),
            "event_type": [event_type.as_json()] if event_type else [],
            "action": action or default_action,
            "outcome": int(outcome),
            "outcome_text": text,
            "source": self.source,
            "participants": [p.as_json() for p in participants],
            "objects": list(objects),
            "detail": dict(detail or {}),
        }
        try:
            self._append(entry)
        except OSError as exc:
            log.error("audit record %s could not be written to %s: %s", event, self.log_file, exc)
            return None
        if self._syslog is not None:
            self._syslog.send(entry)
        return entry

    def _append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            _secure_dir(self.log_file.parent)
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
            fd = os.open(self.log_file, flags, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                previous = _last_line(fd)
                entry["prev"] = line_digest(previous) if previous is not None else None
                data = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = "\n" + data  # a line cut short by a crash stays on its own
                os.write(fd, data.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def patient_ref(self, patient_id: str, issuer: str = "") -> dict[str, Any]:
        """The patient as a ParticipantObject: a keyed hash of issuer and ID, never the ID."""
        if self._key is None:
            try:
                self._key = load_or_create_key(self.key_file)
            except OSError as exc:  # the record is still written, without the patient
                log.error("audit key %s unusable: %s", self.key_file, exc)
                return {"type": "patient", "role": "patient", "id": "unavailable"}
        digest = hmac.new(self._key, f"{issuer}\x00{patient_id}".encode(), hashlib.sha256)
        return {
            "type": "patient",
            "role": "patient",
            "id": PATIENT_HASH_PREFIX + digest.hexdigest(),
        }

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) until queued syslog messages are sent."""
        if self._syslog is not None:
            self._syslog.flush(timeout)

    # -- one method per kind of record -------------------------------------------------------
    def application(self, started: bool, *, ae_title: str, what: str) -> None:
        """The node (``what``: serve, worker) started or stopped."""
        event = AuditEvent.APPLICATION_START if started else AuditEvent.APPLICATION_STOP
        user = Participant(ae_title, requestor=False, role="application")
        self.record(event, text=what, participants=[user], detail={"process": what})

    def association_start(
        self,
        *,
        calling: Participant,
        called_aet: str,
        accepted: bool,
        reason: str,
        listener: str,
    ) -> None:
        """An association request was accepted or rejected (``reason`` says why)."""
        outcome = Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE
        called = Participant(called_aet, requestor=False, role="application")
        self.record(
            AuditEvent.ASSOCIATION_START,
            outcome=outcome,
            text=reason,
            participants=[calling, called],
            detail={"listener": listener, "accepted": accepted},
        )

    def association_end(
        self,
        *,
        calling: Participant,
        called_aet: str,
        how: str,
        transfers: Transfers,
        failed: int,
        listener: str,
    ) -> None:
        """An accepted association ended (``how``: released, aborted); then one
        instances-received record per study it stored."""
        ok = how == "released" and not failed
        called = Participant(called_aet, requestor=False, role="application")
        self.record(
            AuditEvent.ASSOCIATION_END,
            outcome=Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
            text=f"{how}: {transfers.instances} instances stored, {failed} failed",
            participants=[calling, called],
            detail={"listener": listener, "instances": transfers.instances, "failed": failed},
        )
        source = Participant(
            calling.user_id, True, "source", calling.address, calling.port, calling.tls_subject
        )
        self._received(source, called_aet, transfers)

    def instances_retrieved(
        self, *, source_aet: str, peer: str, destination_aet: str, transfers: Transfers
    ) -> None:
        """Instances the node retrieved on its own association (C-GET from a PACS)."""
        address, _, port = peer.rpartition(":")
        source = Participant(source_aet, False, "source", address or peer, int(port or 0) or None)
        self._received(source, destination_aet, transfers)

    def _received(self, source: Participant, destination_aet: str, transfers: Transfers) -> None:
        """One instances-received record per study of ``transfers``."""
        destination = Participant(destination_aet, requestor=False, role="destination")
        for tally in transfers.studies.values():
            new = sum(tally.sop_classes.values()) - tally.duplicates
            self.record(
                AuditEvent.INSTANCES_RECEIVED,
                text=f"{new} new, {tally.duplicates} already held",
                participants=[source, destination],
                objects=self._study_objects(tally),
                action="C" if new else "R",
            )

    def query(
        self,
        *,
        calling_aet: str,
        called_aet: str,
        peer: str,
        ok: bool,
        text: str,
        patient_id: str,
        issuer: str = "",
    ) -> None:
        """The node queried a PACS (prefetch C-FIND) for a patient's studies and series."""
        address, _, port = peer.rpartition(":")
        who = Participant(calling_aet, True, "source")
        pacs = Participant(
            called_aet, False, "destination", address or peer, int(port or 0) or None
        )
        self.record(
            AuditEvent.QUERY,
            outcome=Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
            text=text,
            participants=[who, pacs],
            objects=[self.patient_ref(patient_id, issuer)] if patient_id else [],
            detail={"model": "Study Root Query/Retrieve"},
        )

    def node_authentication_failure(self, *, peer: str, reason: str, listener: str) -> None:
        """A connection was refused before any association (TLS handshake, plain on TLS)."""
        address, _, port = peer.rpartition(":")
        who = Participant("?", True, "application", address or peer, int(port or 0) or None)
        self.record(
            AuditEvent.NODE_AUTHENTICATION_FAILURE,
            outcome=Outcome.MINOR_FAILURE,
            text=reason,
            participants=[who],
            detail={"listener": listener},
        )

    def instances_sent(
        self,
        *,
        sender_aet: str,
        destination: Participant,
        transfers: Transfers,
        failed: int,
        reason: str = "",
        requestor: Participant | None = None,
    ) -> None:
        """Instances went to a destination: one record per study (``failed``: instances
        not acknowledged; ``requestor``: the person who asked, for a CLI send)."""
        source = Participant(sender_aet, requestor=requestor is None, role="source")
        people = [source, destination] + ([requestor] if requestor else [])
        outcome = Outcome.SUCCESS if not failed else Outcome.MINOR_FAILURE
        text = f"{transfers.instances} acknowledged, {failed} not" + (
            f": {reason}" if reason else ""
        )
        studies: list[StudyTally | None] = [*transfers.studies.values()] or [None]
        for tally in studies:
            self.record(
                AuditEvent.INSTANCES_SENT,
                outcome=outcome,
                text=text,
                participants=people,
                objects=self._study_objects(tally) if tally else [],
            )

    def config_change(
        self, change: ConfigChange, *, ae_title: str, user: str | None = None
    ) -> None:
        """A config file was reloaded: applied (the keys that changed) or rejected (why)."""
        who = [Participant(user, True, "user")] if user else []
        obj = {"type": "config", "id": str(change.path), "sha256": change.sha256}
        self.record(
            AuditEvent.CONFIG_CHANGE,
            outcome=Outcome.SUCCESS if change.applied else Outcome.MINOR_FAILURE,
            text="applied" if change.applied else f"rejected: {change.error}",
            participants=[*who, Participant(ae_title, not who, "application")],
            objects=[obj],
            detail={"keys": change.keys},
        )

    def certificate_change(self, *, applied: bool, reason: str, files: Iterable[Path]) -> None:
        """The TLS listener's certificate files or settings changed (applied or not)."""
        self.record(
            AuditEvent.CERTIFICATE_CHANGE,
            outcome=Outcome.SUCCESS if applied else Outcome.MINOR_FAILURE,
            text=reason,
            objects=[{"type": "file", "id": str(p)} for p in files],
        )

    def job_action(
        self,
        action: JobAction,
        job_id: int,
        *,
        result: str,
        ok: bool = True,
        user: str | None = None,
        patient_id: str | None = None,
        issuer: str = "",
    ) -> None:
        """An admin acted on a job (``result``: what the node answered)."""
        person = Participant(user or getpass.getuser(), True, "user")
        objects: list[Mapping[str, Any]] = [{"type": "job", "id": str(job_id)}]
        if patient_id:
            objects.append(self.patient_ref(patient_id, issuer))
        self.record(
            AuditEvent.JOB_ACTION,
            outcome=Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
            text=f"{action}: {result}",
            participants=[person],
            objects=objects,
            detail={"action": str(action)},
        )

    def user_authentication(
        self, *, user: str, client: str, success: bool, logout: bool = False
    ) -> None:
        """A person logged in to (or out of) the admin console, or failed to."""
        self.record(
            AuditEvent.USER_LOGOUT if logout else AuditEvent.USER_LOGIN,
            outcome=Outcome.SUCCESS if success else Outcome.MINOR_FAILURE,
            text="logout" if logout else ("login" if success else "login failed"),
            participants=[Participant(user, True, "user")],
            detail={"client": client},
        )

    def _study_objects(self, tally: StudyTally) -> list[dict[str, Any]]:
        study = {
            "type": "study",
            "id": tally.study_uid,
            "sop_classes": [{"uid": u, "count": n} for u, n in sorted(tally.sop_classes.items())],
        }
        return [study, self.patient_ref(tally.patient_id, tally.issuer)]


# -- one trail per process and settings -----------------------------------------------------
_TRAILS: dict[tuple[Any, ...], AuditTrail] = {}
_TRAILS_LOCK = threading.Lock()


def trail(config: NodeConfig) -> AuditTrail:
    """The process's audit trail for ``config``'s audit settings (made on first use; a
    reloaded config with other settings gets its own)."""
    log_file, key_file = config.audit.paths(config.storage.root)
    key = (log_file, key_file, config.audit.syslog, config.node.ae_title)
    with _TRAILS_LOCK:
        found = _TRAILS.get(key)
        if found is None:
            found = _TRAILS[key] = AuditTrail(
                log_file, key_file, source_id=config.node.ae_title, syslog=config.audit.syslog
            )
        return found


def flush_all(timeout: float = 5.0) -> None:
    """Send what the process's trails still queue for syslog (at exit)."""
    with _TRAILS_LOCK:
        trails = list(_TRAILS.values())
    for t in trails:
        t.flush(timeout)


def job_action(
    config: NodeConfig,
    action: JobAction,
    job_id: int,
    *,
    result: str,
    ok: bool = True,
    user: str | None = None,
    patient_id: str | None = None,
    issuer: str = "",
) -> None:
    """Record an admin's action on a job, e.g.
    ``audit.job_action(cfg, JobAction.ACCEPT_REGISTRATION, job_id, result=message)``."""
    t = trail(config)
    t.job_action(
        action, job_id, result=result, ok=ok, user=user, patient_id=patient_id, issuer=issuer
    )
    t.flush()
