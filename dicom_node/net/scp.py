"""The DICOM listener: Verification and Storage SCP for CT, MR, Enhanced CT, Enhanced MR.

Other SOP classes are refused at association negotiation; who may associate is decided by
:mod:`dicom_node.net.associations` (called and calling AE titles, host pins, a limit on
established associations; over TLS also the calling-AE/certificate binding). Received datasets
are streamed to files in the store's staging folder and stored through
:func:`dicom_node.net.receive.store_from_event`: the bytes as received, never re-encoded,
checked in full against the request's presentation context; a :class:`NodeError` becomes its
DIMSE failure status with an Error Comment saying why. A watchdog aborts a transfer that runs
past twice ``storage.max_instance_mb`` (up to that a too-large instance is received and
refused with status 0xA701, so the sender can show why) or while the disk is below
``storage.min_free_mb``. One log line per association.

Two listeners share one application entity (so the access rules and the association limit
cover both): the plain one on ``node.port`` (off when it is null) and, with ``node.tls``, the
TLS one (:mod:`dicom_node.net.tls_listener`). The TLS additions (the calling-AE/certificate
binding) and the audit records of every association are kept in the marked helpers below.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
)
from pynetdicom import AE, evt

from dicom_node import audit, metrics
from dicom_node.config import NodeConfig
from dicom_node.config_security import TlsServerSection
from dicom_node.errors import STATUS_PROCESSING_FAILURE, NetworkError, NodeError
from dicom_node.net.associations import (
    MAX_PENDING_CONNECTIONS,
    REJECT_CALLING_AET,
    AccessPolicy,
    AssociationRecord,
    Associations,
    Refusal,
    ending,
    log_summary,
)
from dicom_node.net.certs import check_server_files
from dicom_node.net.receive import (
    bytes_arriving,
    discard_partial_dataset,
    failure,
    route_received_files,
    store_from_event,
    sweep_staging,
    unroute_received_files,
)
from dicom_node.net.tls import (
    PROFILE_NAME,
    ContextChange,
    ServerContextSource,
    subject_matches,
    tls_peer,
)
from dicom_node.net.tls_listener import start_tls_server
from dicom_node.net.transport import guard_server
from dicom_node.states import AssociationResult, CheckSeverity, Listener, StoreResult
from dicom_node.storage.store import MB, Store

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    str(CTImageStorage),
    str(EnhancedCTImageStorage),
    str(MRImageStorage),
    str(EnhancedMRImageStorage),
)

# Every syntax here can be decoded by pydicom with the pylibjpeg plugins (or natively).
# pynetdicom accepts, per presentation context, the first syntax of THIS list that the caller
# proposed. Order: lossless compressed first (a sender offering its compressed file plus
# uncompressed fallbacks in one context keeps its encoding, no transcoding), then
# uncompressed, then lossy syntaxes last, so that a sender holding uncompressed data is never
# asked to compress it lossily; lossy data offered only as lossy is still accepted.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian (also offered first for Verification)
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old devices)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, non-hierarchical (process 14)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
UNCOMPRESSED = TRANSFER_SYNTAXES[:4]
LOSSLESS_COMPRESSED = TRANSFER_SYNTAXES[4:9]
LOSSY = TRANSFER_SYNTAXES[9:]
STORAGE_PREFERENCE: tuple[str, ...] = LOSSLESS_COMPRESSED + UNCOMPRESSED + LOSSY

MAX_PDU_SIZE = 262_144
ABORT_FACTOR = 2
"""An instance still arriving at this multiple of ``storage.max_instance_mb`` is aborted."""
WATCH_INTERVAL = 1.0
"""Seconds between two looks at the transfers in progress (size, free disk space)."""
PENDING_HEADROOM = 2 * MAX_PENDING_CONNECTIONS
"""pynetdicom's own association cap sits this far above node.max_associations: it counts
connections still waiting to send their request, which the node counts separately."""


class StorageSCP:
    """pynetdicom servers bound to one :class:`Store`; reconfigurable while running."""

    def __init__(self, config: NodeConfig, store: Store) -> None:
        """Prepare the application entity from ``config`` (nothing listens until start())."""
        self._config = config
        self._store = store
        self._server: Any = None
        self._tls_server: Any = None
        self._tls_source = self._make_tls_source(config)
        self.associations = Associations()
        self._policy = AccessPolicy.from_config(config.node)
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None
        ae = AE(ae_title=config.node.ae_title)
        ae.add_supported_context(VERIFICATION, list(UNCOMPRESSED[:3]))
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(STORAGE_PREFERENCE))
        node = config.node
        ae.acse_timeout = node.association_request_timeout_seconds
        ae.dimse_timeout = node.network_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        ae.maximum_pdu_size = MAX_PDU_SIZE
        self._ae = ae
        self._apply(config)

    # -- configuration -------------------------------------------------------------------
    def _apply(self, config: NodeConfig) -> None:
        node = config.node
        self._policy = AccessPolicy.from_config(node)
        # The policy decides in EVT_REQUESTED; pynetdicom's own checks stay as a backstop.
        self._ae.require_called_aet = not node.accept_any_called_aet
        self._ae.require_calling_aet = list(node.calling_aets)
        self._ae.maximum_associations = node.max_associations + PENDING_HEADROOM
        self._ae.ae_title = node.ae_title
        for server in self._listeners():
            server.ae_title = node.ae_title
        self._config = config

    def reload(self, config: NodeConfig) -> None:
        """Apply a new config: access rules, own AE title, association limit (no restart)."""
        old = self._config.node
        self._apply(config)
        if self._tls_source is not None and config.node.tls is not None:
            self._tls_source.update(config.node.tls)
        new = config.node
        if (old.allowed_calling_aets, old.calling_aet_hosts) != (
            new.allowed_calling_aets,
            new.calling_aet_hosts,
        ):
            _log_access(config)

    @property
    def port(self) -> int | None:
        """The plain TCP port actually listened on (None when the plain listener is off)."""
        if self._server is None:
            return self._config.node.port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The TLS port actually listened on (None without ``node.tls``)."""
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        return self._config.node.tls.port if self._config.node.tls else None

    def _listeners(self) -> list[Any]:
        return [s for s in (self._server, self._tls_server) if s is not None]

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Listen on node.host:node.port (and node.tls.port) in background threads."""
        node = self._config.node
        route_received_files(self._store.staging)
        if node.port is not None:
            self._server = self._listen(node.port, self._handlers())
            guard_server(self._server, timeout=node.network_timeout_seconds)
        if node.tls is not None and self._tls_source is not None:
            self._tls_server = self._listen(node.tls.port, self._handlers(), tls=True)
            self._tls_source.start()
        self._watching.clear()
        self._watcher = threading.Thread(
            target=self._watch_transfers, name="scp-transfer-watch", daemon=True
        )
        self._watcher.start()
        _log_access(self._config)
        log.info(
            "listening as AE %r on %s, port %s plain, %s TLS (max %d associations), storing "
            "under %s",
            node.ae_title,
            node.host,
            self.port or "no",
            self.tls_port or "no",
            node.max_associations,
            self._store.root,
        )
        if node.tls is not None:
            log.info(
                "TLS port %d: %s, client certificate %s, %d calling AE title(s) bound to "
                "certificates",
                self.tls_port,
                PROFILE_NAME,
                "required" if node.tls.require_client_certificate else "optional",
                len(node.tls.calling_aet_subjects),
            )

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_outcome, ["accepted"]),
            (evt.EVT_REJECTED, self._on_outcome, ["rejected"]),
            (evt.EVT_RELEASED, self._on_outcome, ["released"]),
            (evt.EVT_ABORTED, self._on_outcome, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]

    def _listen(self, port: int, handlers: list[Any], *, tls: bool = False) -> Any:
        node = self._config.node
        address = (node.host, port)
        try:
            if tls and self._tls_source is not None:
                return start_tls_server(
                    self._ae,
                    address,
                    ae_title=node.ae_title,
                    evt_handlers=handlers,
                    source=self._tls_source,
                    handshake_timeout=node.network_timeout_seconds,
                    on_refused=self._on_tls_refused,
                )
            return self._ae.start_server(
                address, block=False, evt_handlers=handlers, ae_title=node.ae_title
            )
        except OSError as exc:
            self.stop(graceful=False)  # a listener already started must not linger
            raise NetworkError(f"cannot listen on {node.host}:{port}: {exc}") from exc

    def active_associations(self) -> int:
        """Number of established associations in progress (both listeners)."""
        return self.associations.established

    def stop(self, graceful: bool = True, timeout: float | None = None) -> bool:
        """Stop listening; if graceful, let in-flight associations finish (up to ``timeout``).

        Returns True when no association had to be aborted.
        """
        servers = self._listeners()
        self._server = self._tls_server = None
        if self._tls_source is not None:
            self._tls_source.stop()
        self._watching.set()
        if not servers:
            return True
        for server in servers:
            server.shutdown()  # closes the listening socket: no new associations
        unroute_received_files(self._store.staging)
        if timeout is None:
            timeout = self._config.node.shutdown_timeout_seconds
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        active = []
        for assoc in [a for server in servers for a in server.active_associations]:
            if self.associations.record(assoc).requested:
                active.append(assoc)
            else:  # a connection that never asked for an association: nothing in flight
                assoc.abort()
        if active:
            log.info("waiting for %d association(s) to finish", len(active))
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
        remaining = [a for a in active if a.is_alive()]
        for assoc in remaining:
            log.warning(
                "aborting association from %s at shutdown", self.associations.record(assoc).peer
            )
            self.associations.node_aborts(assoc, "shutdown")
            assoc.abort()
        log.info("listener stopped")
        return not remaining

    # -- event handlers (run in association threads) ------------------------------------
    def _on_open(self, event: Any) -> None:
        oldest = self.associations.opened(event.assoc)
        self._note_tls(event.assoc, self.associations.record(event.assoc))
        if oldest is not None:
            log.warning("too many connections without an association request: dropping one")
            _end_wait_for_request(oldest)

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        rec = self.associations.record(assoc)
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        binding = self._binding_refusal(calling, rec)
        refusal = self.associations.admit(
            assoc, self._policy, Refusal(REJECT_CALLING_AET, binding) if binding else None
        )
        if refusal is None:
            return
        self._rejected(rec, refusal.reason)  # pynetdicom fires no EVT_REJECTED for this
        assoc.acse.send_reject(*refusal.reject)
        assoc.kill()  # as pynetdicom after its own rejections: the RJ is sent, the DUL ends

    def _on_outcome(self, event: Any, outcome: str) -> None:
        rec = self.associations.record(event.assoc)
        self.associations.set_outcome(event.assoc, outcome)
        if outcome == "rejected":  # by pynetdicom's own checks (the backstop)
            self._rejected(rec, _reject_reason(event.assoc))
        elif outcome == "accepted":
            self._audit_start(rec, accepted=True, reason="accepted")

    def _rejected(self, rec: AssociationRecord, reason: str) -> None:
        if rec.refusal is None:
            rec.refusal = reason
        metrics.association_ended(AssociationResult.REJECTED)
        self._audit_start(rec, accepted=False, reason=rec.refusal)

    def _on_close(self, event: Any) -> None:
        assoc = event.assoc
        discard_partial_dataset(assoc)
        rec = self.associations.closed(assoc)
        if rec is None:
            return
        if not rec.requested:
            # pynetdicom's acceptor would otherwise keep waiting for the A-ASSOCIATE-RQ until
            # the ACSE timeout: a closed probe (a TCP health check) ends that wait at once.
            _end_wait_for_request(assoc)
        log_summary(rec, assoc)
        if rec.requested and rec.refusal is None:
            how = ending(rec, assoc)
            released = how == AssociationResult.RELEASED
            metrics.association_ended(
                AssociationResult.RELEASED if released else AssociationResult.ABORTED
            )
            self._audit_end(rec, how)
            sweep_staging(self._store.staging, self._config.node.network_timeout_seconds)

    def _watch_transfers(self) -> None:
        """Once a second: abort a transfer that runs past twice ``storage.max_instance_mb``, or
        any transfer while the disk is below ``storage.min_free_mb`` (a thread of its own, so
        receiving costs nothing per PDU)."""
        while not self._watching.wait(WATCH_INTERVAL):
            try:
                free: int | None = shutil.disk_usage(self._store.root).free
            except OSError:
                free = None
            for assoc in [a for server in self._listeners() for a in server.active_associations]:
                size = bytes_arriving(assoc)
                if size is None:
                    continue
                reason = None
                if size > ABORT_FACTOR * self._store.max_instance_mb * MB:
                    reason = f"instance over {ABORT_FACTOR} x storage.max_instance_mb arriving"
                elif free is not None and free < self._store.min_free_mb * MB:
                    reason = "free disk space below storage.min_free_mb while receiving"
                if reason is not None:
                    rec = self.associations.record(assoc)
                    log.warning(
                        "aborting association from AE %r at %s: %s",
                        rec.calling_aet,
                        rec.peer,
                        reason,
                    )
                    self.associations.node_aborts(assoc, reason)
                    assoc.abort()

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int | Dataset:
        rec = self.associations.record(event.assoc)
        t0 = time.perf_counter()
        try:
            stored = store_from_event(
                self._store, event, calling_aet=rec.calling_aet, peer=rec.peer
            )
        except NodeError as exc:
            metrics.instance_received(StoreResult.FAILED, time.perf_counter() - t0)
            return self._refused(rec, exc.status, str(exc), exc)
        except Exception as exc:
            metrics.instance_received(StoreResult.FAILED, time.perf_counter() - t0)
            log.exception("C-STORE from AE %r at %s: unexpected error", rec.calling_aet, rec.peer)
            return self._refused(rec, STATUS_PROCESSING_FAILURE, "internal error", exc)
        result = StoreResult.DUPLICATE if stored.duplicate else StoreResult.STORED
        metrics.instance_received(result, time.perf_counter() - t0, stored.size)
        rec.instances += 1
        rec.bytes += stored.size
        rec.duplicates += stored.duplicate
        rec.replaced += stored.replaced
        rec.transfers.add(
            stored.study_instance_uid,
            stored.sop_class_uid,
            patient_id=stored.patient_id,
            issuer=stored.issuer_of_patient_id,
            duplicate=stored.duplicate,
        )
        return 0x0000

    def _refused(
        self, rec: AssociationRecord, status: int, why: str, exc: Exception | None
    ) -> Dataset:
        rec.failed += 1
        if isinstance(exc, NodeError) or exc is None:
            log.warning(
                "C-STORE from AE %r at %s refused with status 0x%04X: %s",
                rec.calling_aet,
                rec.peer,
                status,
                why,
            )
        return failure(status, why)

    # -- TLS: the listener's context, the calling-AE/certificate binding ------------------
    def _make_tls_source(self, config: NodeConfig) -> ServerContextSource | None:
        if config.node.tls is None:
            return None
        source = ServerContextSource(config.node.tls, on_change=self._on_certificate_change)
        _log_certificate_findings(config.node.tls)
        return source

    def _note_tls(self, assoc: Any, rec: AssociationRecord) -> None:
        sock = getattr(getattr(assoc, "dul", None), "socket", None)
        rec.tls = tls_peer(getattr(sock, "socket", None))
        rec.listener = Listener.TLS if rec.tls is not None else Listener.PLAIN

    def _binding_refusal(self, calling: str, rec: AssociationRecord) -> str | None:
        """Why ``calling`` may not use this connection under node.tls.calling_aet_subjects."""
        tls = self._config.node.tls
        bound = tls.calling_aet_subjects if tls is not None else {}
        if not bound:
            return None
        if rec.tls is None:
            if calling in bound:
                return f"calling AE {calling!r} is bound to a certificate: it must use TLS"
            return None
        if calling not in bound:
            return f"calling AE {calling!r} is not in node.tls.calling_aet_subjects"
        if not subject_matches(bound[calling], rec.tls.certificate):
            return f"certificate {rec.tls.subject!r} is not bound to calling AE {calling!r}"
        return None

    def _on_tls_refused(self, peer: str, reason: str) -> None:
        log.warning("TLS connection from %s refused: %s", peer, reason)
        trail = audit.trail(self._config)
        trail.node_authentication_failure(peer=peer, reason=reason, listener=Listener.TLS)

    def _on_certificate_change(self, change: ContextChange) -> None:
        trail = audit.trail(self._config)
        trail.certificate_change(applied=change.applied, reason=change.reason, files=change.files)
        if change.applied and self._tls_source is not None:
            _log_certificate_findings(self._tls_source.config)

    # -- audit records of associations ----------------------------------------------------
    def _calling(self, rec: AssociationRecord) -> audit.Participant:
        address, _, port = rec.peer.rpartition(":")
        subject = rec.tls.subject if rec.tls is not None else None
        return audit.Participant(
            rec.calling_aet, True, "application", address, int(port), tls_subject=subject
        )

    def _audit_start(self, rec: AssociationRecord, *, accepted: bool, reason: str) -> None:
        audit.trail(self._config).association_start(
            calling=self._calling(rec),
            called_aet=self._config.node.ae_title,
            accepted=accepted,
            reason=reason,
            listener=rec.listener,
        )

    def _audit_end(self, rec: AssociationRecord, how: str) -> None:
        audit.trail(self._config).association_end(
            calling=self._calling(rec),
            called_aet=self._config.node.ae_title,
            how=how,
            transfers=rec.transfers,
            failed=rec.failed,
            listener=rec.listener,
        )


def _end_wait_for_request(assoc: Any) -> None:
    """End pynetdicom's wait for an A-ASSOCIATE-RQ the way its timeout does (Association
    .run_reactor: primitive None -> kill, connection shut down)."""
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if queue is not None:
        queue.put(None)


def _log_access(config: NodeConfig) -> None:
    node = config.node
    if node.accepts_any_caller:
        log.warning("node.allowed_calling_aets is ANY: any calling AE may store to this node")
    else:
        log.info("allowed calling AE titles: %s", ", ".join(node.calling_aets))
    for aet, hosts in node.calling_aet_hosts.items():
        log.info("calling AE %r is accepted only from %s", aet, ", ".join(hosts))


def _log_certificate_findings(cfg: TlsServerSection) -> None:
    """Warn about what ``config check`` would warn about (expiry within 30 days, ...)."""
    for finding in check_server_files(cfg):
        if finding.severity != CheckSeverity.OK:
            log.warning("TLS %s: %s", finding.where, finding.message)


_REJECT_REASONS: dict[tuple[int, int, int], str] = {
    (0x01, 0x01, 0x03): "calling AE title not recognised (node.allowed_calling_aets)",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x03, 0x02): "too many associations (node.max_associations)",
    (0x02, 0x02, 0x01): "user identity not accepted",
}


def _reject_reason(assoc: Any) -> str:
    """Why pynetdicom rejected an association, from its A-ASSOCIATE-RJ primitive."""
    prim = getattr(assoc.acceptor, "primitive", None)
    key = tuple(getattr(prim, k, None) for k in ("result", "result_source", "diagnostic"))
    found = _REJECT_REASONS.get(key)  # type: ignore[arg-type]
    return found or f"result {key[0]}, source {key[1]}, reason {key[2]}"
