"""pynetdicom client: C-ECHO and C-STORE to a destination, checking every returned status.

Sending (:func:`send_files`, :func:`send_datasets`):

* Instances are grouped by SeriesInstanceUID; each series goes over its own association.
* For every SOP class the association proposes the stored transfer syntax (its own presentation
  context when compressed) and a context with the uncompressed fallbacks Explicit VR Little
  Endian and Implicit VR Little Endian. When the peer accepts only an uncompressed syntax for a
  compressed instance, the instance is decompressed (pydicom + pylibjpeg) before it is sent,
  keeping its SOPInstanceUID (lossless decompression is the same instance).
* Status 0x0000 is success; the warnings 0xB000, 0xB006 and 0xB007 count as success and are
  logged; anything else, or no answer at all, is a failure for that instance.
* Failed instances are retried with exponential backoff (``backoff_seconds * 2**n``) on a new
  association, at most ``retries`` more times, and only those not yet acknowledged. Failures that
  a retry cannot fix (SOP class or transfer syntax not accepted, a "cannot understand" or "data
  set does not match" status, a permanent A-ASSOCIATE-RJ, an unreadable file) are not retried.
* Any instance not acknowledged in the end makes the whole send a failure: :class:`SendError`
  carrying ``sent``, ``failed`` (SOPInstanceUID or path -> reason) and ``attempts``.
* One summary line per send at INFO (destination, instances, bytes, seconds, outcome); patient
  identifiers never appear at INFO.
* With TLS settings (``SendOptions.tls``, a destination's ``tls`` section) every association is
  DICOM over TLS with the BCP 195 non-downgrading profile (:mod:`dicom_node.net.tls`): the
  peer's certificate is verified, its host name checked unless switched off, and a failed
  handshake names its reason (unknown CA, host name mismatch, ...). The context is built from
  the files for every send, so renewed certificates apply to the next send.
"""

from __future__ import annotations

import copy
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import audit
from dicom_node.config_security import DestinationTls
from dicom_node.errors import NetworkError, SendError
from dicom_node.net.tls import ClientContext, destination_context, tls_peer

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
#: C-STORE warning statuses that still mean "stored" (coercion, element discarded, SOP mismatch).
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
UNCOMPRESSED_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # DICOM limit of presentation contexts per association
SETTLE_SECONDS = 5.0
"""How long to wait for a failed association's thread to finish before reading why it failed."""


class DestinationLike(Protocol):
    """What the SCU needs of a destination (``config.Destination`` fits)."""

    @property
    def ae_title(self) -> str:
        """Called AE title of the peer."""
        ...

    @property
    def host(self) -> str:
        """Host name or address of the peer."""
        ...

    @property
    def port(self) -> int:
        """TCP port of the peer."""
        ...


@dataclass
class SendResult:
    """Outcome of a send in which every instance was acknowledged.

    ``sop_instance_uids`` lists the acknowledged instances in send order; ``attempts`` counts
    association attempts over all series; ``bytes_sent`` counts the bytes written to the network
    (PDUs), ``warnings`` maps SOPInstanceUID -> warning status, ``failures`` maps SOPInstanceUID
    (or the path of an unreadable file) -> reason (empty unless the send failed).
    """

    sent: int
    failed: int
    sop_instance_uids: list[str]
    seconds: float
    attempts: int
    bytes_sent: int = 0
    warnings: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class _Item:
    """One instance to send: a file (read at send time) or an in-memory dataset."""

    sop_class: UID
    sop_uid: str
    series_uid: str
    transfer_syntax: UID
    path: Path | None = None
    dataset: Dataset | None = None
    study: tuple[str, str, str] = ("", "", "")
    """Study UID, patient ID and issuer: for the audit record of the send only."""


def _study(ds: Dataset) -> tuple[str, str, str]:
    keys = ("StudyInstanceUID", "PatientID", "IssuerOfPatientID")
    return (str(ds.get(keys[0], "")), str(ds.get(keys[1], "")), str(ds.get(keys[2], "")))


@dataclass
class _State:
    """Running totals of one send call."""

    acked: list[str] = field(default_factory=list)
    warnings: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    bytes_sent: int = 0
    transfers: audit.Transfers = field(default_factory=audit.Transfers)
    peer_subject: str | None = None


def describe(dest: DestinationLike) -> str:
    """``AE@host:port`` of a destination, for messages."""
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def _make_ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


class _Wire:
    """Socket facts of one association: did TCP connect, how many bytes went out.

    Its handlers also set ``TCP_NODELAY``: a C-STORE goes out as a small command PDU followed by
    data PDUs, and with Nagle's algorithm and the peer's delayed ACK that can cost up to 40 ms
    per instance.
    """

    def __init__(self, tls: ClientContext | None = None) -> None:
        self.connected = False
        self.bytes_sent = 0
        self.peer_subject: str | None = None
        self.tls = tls
        if tls is not None:
            tls.handshake_error = None

    def handlers(self) -> list[EventHandlerType]:
        """pynetdicom ``evt_handlers`` for ``AE.associate``."""
        return [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_DATA_SENT, self._on_sent)]

    def _on_open(self, event: evt.Event) -> None:
        self.connected = True
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        peer = tls_peer(sock)
        self.peer_subject = peer.subject if peer is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # not fatal: only slower
                log.debug("could not set TCP_NODELAY: %s", exc)

    def _on_sent(self, event: evt.Event) -> None:
        self.bytes_sent += len(event.data)

    def why_not_established(self, assoc: Association, dest: DestinationLike) -> tuple[str, bool]:
        """Why ``assoc`` was not established, and whether that is permanent.

        pynetdicom's ``associate`` can return as soon as the peer closes the connection, while
        the association's own thread is still reading the A-ASSOCIATE-RJ that came before the
        close: the flags are read once that thread has ended, or a permanent rejection would
        look like an abort and be retried."""
        if assoc.is_alive():
            assoc.join(timeout=SETTLE_SECONDS)
        if not self.connected:
            if self.tls is not None and self.tls.handshake_error:
                return f"TLS to {dest.host}:{dest.port} failed: {self.tls.handshake_error}", False
            return f"cannot connect to {dest.host}:{dest.port}", False
        if assoc.is_rejected:
            prim = assoc.acceptor.primitive
            result = getattr(prim, "result", None)
            source = getattr(prim, "result_source", None)
            diag = getattr(prim, "diagnostic", None)
            permanent = result == 0x01
            kind = "permanent" if permanent else "transient"
            return f"association rejected ({kind}, source {source}, reason {diag})", permanent
        if assoc.is_aborted:
            return "association aborted by the peer", False
        return "association not established (no answer)", False


def _tls_args(dest: DestinationLike, ctx: ClientContext | None) -> tuple[ClientContext, str] | None:
    return (ctx, dest.host) if ctx is not None else None


def echo(
    dest: DestinationLike,
    *,
    calling_aet: str,
    timeout: float = 10,
    tls: DestinationTls | None = None,
) -> None:
    """C-ECHO ``dest`` (over TLS with ``tls``); raise :class:`NetworkError` unless it answers
    Success (:class:`~dicom_node.errors.TlsConfigError` when the TLS files are unusable)."""
    ae = _make_ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    ctx = destination_context(tls) if tls is not None else None
    wire = _Wire(ctx)
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        evt_handlers=wire.handlers(),
        tls_args=_tls_args(dest, ctx),
    )
    if not assoc.is_established:
        reason, _ = wire.why_not_established(assoc, dest)
        raise NetworkError(f"echo {describe(dest)} failed: {reason}")
    try:
        rsp = assoc.send_c_echo()
    except ValueError as exc:  # Verification context not accepted
        raise NetworkError(f"echo {describe(dest)} failed: {exc}") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    status = rsp.get("Status") if rsp else None
    if status != STATUS_SUCCESS:
        shown = "no response" if status is None else f"status 0x{int(status):04X}"
        raise NetworkError(f"echo {describe(dest)} failed: {shown}")
    log.info("echo %s ok", describe(dest))


@dataclass(frozen=True)
class SendOptions:
    """How one send behaves: who we are, how often and how long we try."""

    calling_aet: str
    retries: int = 3
    """Further associations per series for instances not yet acknowledged."""
    backoff_seconds: float = 1.0
    """Wait before retry n: ``backoff_seconds * 2**(n-1)``."""
    timeout: float = 30.0
    """ACSE, DIMSE, network and connection timeout of each association (seconds)."""
    tls: DestinationTls | None = None
    """DICOM TLS settings of the destination (None: plain DICOM)."""
    audit: audit.AuditTrail | None = None
    """Where to record what was sent (one instances-sent record per study and send)."""
    requested_by: str | None = None
    """The person who asked for the send (a CLI user), for the audit record."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_seconds < 0 or self.timeout <= 0:
            raise ValueError("retries and backoff_seconds must be >= 0, timeout > 0")


def send_files(
    dest: DestinationLike, paths: Sequence[Path | str], *, options: SendOptions
) -> SendResult:
    """C-STORE the DICOM files ``paths`` to ``dest``, one association per series.

    Raises :class:`SendError` when any instance is not acknowledged after ``options.retries``
    further attempts (see the module docstring for statuses, fallbacks and retry rules).
    """
    items: list[_Item] = []
    unreadable: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        try:
            items.append(_item_from_file(path))
        except (OSError, InvalidDicomError, AttributeError, KeyError, ValueError) as exc:
            unreadable[str(path)] = f"unreadable: {exc}"
    return _Sender(dest, options).run(items, unreadable)


def send_datasets(
    dest: DestinationLike, datasets: Iterable[Dataset], *, options: SendOptions
) -> SendResult:
    """C-STORE in-memory datasets (e.g. derived objects); same rules as :func:`send_files`.

    A dataset without ``file_meta.TransferSyntaxUID`` is sent as Explicit VR Little Endian.
    The datasets are not modified.
    """
    items = []
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        ts = UID(getattr(meta, "TransferSyntaxUID", None) or ExplicitVRLittleEndian)
        items.append(
            _Item(
                sop_class=UID(ds.SOPClassUID),
                sop_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                transfer_syntax=ts,
                dataset=ds,
                study=_study(ds),
            )
        )
    return _Sender(dest, options).run(items, {})


def _item_from_file(path: Path) -> _Item:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None:
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit and little else ExplicitVRLittleEndian
    return _Item(
        sop_class=UID(ds.SOPClassUID),
        sop_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        transfer_syntax=UID(ts),
        path=path,
        study=_study(ds),
    )


def _contexts(items: Iterable[_Item]) -> list[PresentationContext]:
    """Per SOP class: each compressed stored syntax alone, plus the uncompressed fallbacks."""
    compressed: dict[UID, list[UID]] = {}
    for item in items:
        syntaxes = compressed.setdefault(item.sop_class, [])
        ts = item.transfer_syntax
        if ts not in UNCOMPRESSED_SYNTAXES and ts not in syntaxes:
            syntaxes.append(ts)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in compressed.items():
        contexts.extend(build_context(sop_class, ts) for ts in syntaxes)
        contexts.append(build_context(sop_class, list(UNCOMPRESSED_SYNTAXES)))
    if len(contexts) > MAX_CONTEXTS:
        raise SendError(f"series needs {len(contexts)} presentation contexts (max {MAX_CONTEXTS})")
    return contexts


class _Sender:
    """One send call: the destination, the options and the running totals."""

    def __init__(self, dest: DestinationLike, options: SendOptions) -> None:
        self.dest = dest
        self.options = options
        self.state = _State()
        self.tls = destination_context(options.tls) if options.tls is not None else None

    def run(self, items: list[_Item], unreadable: dict[str, str]) -> SendResult:
        """Send every series of ``items``; raise :class:`SendError` unless all acknowledged."""
        start = time.monotonic()
        self.state.failures.update(unreadable)
        series: dict[str, dict[str, _Item]] = {}
        for item in items:
            # The same SOPInstanceUID twice in one send is sent once.
            series.setdefault(item.series_uid, {}).setdefault(item.sop_uid, item)
        for series_uid, pending in series.items():
            self._series(series_uid, pending)
        return self._result(time.monotonic() - start, len(series))

    def _result(self, seconds: float, n_series: int) -> SendResult:
        state = self.state
        result = SendResult(
            sent=len(state.acked),
            failed=len(state.failures),
            sop_instance_uids=state.acked,
            seconds=seconds,
            attempts=state.attempts,
            bytes_sent=state.bytes_sent,
            warnings=state.warnings,
            failures=state.failures,
        )
        self._audit(result)
        outcome = "ok" if not state.failures else "FAILED"
        if state.warnings:
            outcome += f" ({len(state.warnings)} with warnings)"
        summary = (
            f"send to {describe(self.dest)}: {result.sent}/{result.sent + result.failed} "
            f"instances in {n_series} series, {result.bytes_sent} bytes, {seconds:.2f} s, "
            f"{result.attempts} association(s), {outcome}"
        )
        if state.failures:
            log.warning(summary)
            first = next(iter(state.failures.items()))
            raise SendError(
                f"{summary}; {result.failed} failed, e.g. {first[0]}: {first[1]}",
                sent=result.sent,
                failed=state.failures,
                attempts=result.attempts,
            )
        log.info(summary)
        return result

    def _audit(self, result: SendResult) -> None:
        trail = self.options.audit
        if trail is None:
            return
        dest = self.dest
        peer = audit.Participant(
            dest.ae_title, False, "destination", dest.host, dest.port, self.state.peer_subject
        )
        person = self.options.requested_by
        trail.instances_sent(
            sender_aet=self.options.calling_aet,
            destination=peer,
            transfers=self.state.transfers,
            failed=result.failed,
            reason=next(iter(result.failures.values()), ""),
            requestor=audit.Participant(person, True, "user") if person else None,
        )

    def _series(self, series_uid: str, pending: dict[str, _Item]) -> None:
        """Send one series, retrying the instances not yet acknowledged."""
        reasons: dict[str, str] = {}
        retries = self.options.retries
        for attempt in range(retries + 1):
            if attempt:
                delay = self.options.backoff_seconds * 2 ** (attempt - 1)
                log.info(
                    "series %s: %d instance(s) not acknowledged by %s, retry %d/%d in %.1f s",
                    series_uid,
                    len(pending),
                    describe(self.dest),
                    attempt,
                    retries,
                    delay,
                )
                time.sleep(delay)
            self.state.attempts += 1
            stop = self._one_association(pending, reasons)
            if not pending or stop:
                break
        for sop_uid in pending:
            self.state.failures[sop_uid] = reasons.get(sop_uid, "not sent")

    def _one_association(self, pending: dict[str, _Item], reasons: dict[str, str]) -> bool:
        """Send ``pending`` over one association, removing acknowledged or hopeless instances.

        Returns True when retrying cannot help (permanent association rejection).
        """
        dest = self.dest
        ae = _make_ae(self.options.calling_aet, self.options.timeout)
        wire = _Wire(self.tls)
        assoc = ae.associate(
            dest.host,
            dest.port,
            contexts=_contexts(pending.values()),
            ae_title=dest.ae_title,
            evt_handlers=wire.handlers(),
            tls_args=_tls_args(dest, self.tls),
        )
        if not assoc.is_established:
            reason, permanent = wire.why_not_established(assoc, dest)
            log.warning("send to %s: %s", describe(dest), reason)
            for sop_uid in pending:
                reasons[sop_uid] = reason
            self.state.bytes_sent += wire.bytes_sent
            return permanent
        self.state.peer_subject = wire.peer_subject
        for sop_uid in pending:
            reasons[sop_uid] = "association ended before it was sent"
        try:
            for msg_id, item in enumerate(list(pending.values()), start=1):
                if not assoc.is_established:
                    break
                self._store_one(assoc, item, msg_id % 65536, pending, reasons)
        finally:
            if assoc.is_established:
                assoc.release()
            self.state.bytes_sent += wire.bytes_sent
        return False

    def _store_one(
        self,
        assoc: Association,
        item: _Item,
        msg_id: int,
        pending: dict[str, _Item],
        reasons: dict[str, str],
    ) -> None:
        """C-STORE one instance and file its outcome."""
        uid = item.sop_uid
        try:
            ds = self._prepared(assoc, item)
            rsp = assoc.send_c_store(ds, msg_id=msg_id)
        except _GiveUp as why:
            self._give_up(uid, str(why), pending)
            return
        except (ValueError, AttributeError) as exc:  # no usable context / cannot encode
            self._give_up(uid, f"cannot send: {exc}", pending)
            return
        status = rsp.get("Status") if rsp else None
        if status is None:
            reasons[uid] = "no response from the peer (timeout or abort)"
            return
        status = int(status)
        comment = rsp.get("ErrorComment", "")
        if status == STATUS_SUCCESS or status in WARNING_STATUSES:
            if status != STATUS_SUCCESS:
                log.warning("instance %s stored with warning 0x%04X %s", uid, status, comment)
                self.state.warnings[uid] = status
            del pending[uid]
            self.state.acked.append(uid)
            study, patient, issuer = item.study
            self.state.transfers.add(study, item.sop_class, patient_id=patient, issuer=issuer)
            return
        reason = f"status 0x{status:04X}" + (f" ({comment})" if comment else "")
        if is_permanent_failure(status):
            self._give_up(uid, reason, pending)
        else:
            reasons[uid] = reason
        log.debug("instance %s failed: %s", uid, reason)

    @staticmethod
    def _prepared(assoc: Association, item: _Item) -> Dataset:
        """The dataset to send over ``assoc``, decompressed when only uncompressed fits."""
        accepted = assoc.accepted_contexts
        syntaxes = {
            UID(cx.transfer_syntax[0]) for cx in accepted if cx.abstract_syntax == item.sop_class
        }
        if not syntaxes:
            raise _GiveUp(f"SOP class {item.sop_class.name} not accepted by the peer")
        ts = item.transfer_syntax
        decompress = ts not in syntaxes and ts.is_compressed
        if decompress and not syntaxes & set(UNCOMPRESSED_SYNTAXES):
            raise _GiveUp(f"transfer syntax {ts.name} not accepted by the peer")
        try:
            return _load(item, decompress)
        except Exception as exc:  # any read/decode error fails this instance only
            raise _GiveUp(f"cannot read/decode for sending: {exc}") from exc

    def _give_up(self, uid: str, reason: str, pending: dict[str, _Item]) -> None:
        del pending[uid]
        self.state.failures[uid] = reason
        log.debug("instance %s not retried: %s", uid, reason)


class _GiveUp(Exception):  # noqa: N818 - control flow inside _Sender, never escapes it
    """This instance cannot be sent to this peer: no retry."""


PERMANENT_FAILURE_STATUSES: dict[int, str] = {
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
}
"""C-STORE failure statuses a resend cannot fix (besides the two ranges below)."""

DATASET_MISMATCH_RANGE = range(0xA900, 0xAA00)
"""0xA9xx: "data set does not match SOP class"."""

CANNOT_UNDERSTAND_RANGE = range(0xC000, 0xD000)
"""0xCxxx: "cannot understand"."""


def is_permanent_failure(status: int) -> bool:
    """True for failure statuses a resend cannot fix (data set / SOP class problems)."""
    return (
        status in DATASET_MISMATCH_RANGE
        or status in CANNOT_UNDERSTAND_RANGE
        or status in PERMANENT_FAILURE_STATUSES
    )


def _load(item: _Item, decompress: bool) -> Dataset:
    """The full dataset of ``item``, decompressed when the peer takes only uncompressed."""
    ds: Dataset
    if item.path is not None:
        ds = pydicom.dcmread(item.path)
    elif item.dataset is not None:
        ds = copy.deepcopy(item.dataset) if decompress else item.dataset
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            # Give pynetdicom a transfer syntax without touching the caller's dataset.
            ds = copy.copy(ds)
            ds.file_meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = item.transfer_syntax
    else:
        raise ValueError("nothing to send")
    if decompress:
        ds.decompress(generate_instance_uid=False)
    return ds
