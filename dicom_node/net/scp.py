"""The DICOM listener: Verification and Storage SCP for CT, MR, Enhanced CT, Enhanced MR.

Other SOP classes are refused at association negotiation. With a non-empty
``node.allowed_calling_aets`` an unknown calling AE gets an A-ASSOCIATE-RJ. Each C-STORE is one
call of :meth:`Store.store_encoded` on the bytes as received (no decoding, no re-encoding); a
:class:`NodeError` becomes its DIMSE failure status. One INFO line is logged per association.

Two listeners share one application entity (so the allow-list and the association limit cover
both): the plain one on ``node.port`` (off when it is null) and, with ``node.tls``, the TLS one
(:mod:`dicom_node.net.tls_listener`). The TLS additions (the calling-AE/certificate binding)
and the audit records of every association are kept in the clearly marked helpers below.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

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
from dicom_node.net.certs import check_server_files
from dicom_node.net.tls import (
    PROFILE_NAME,
    ContextChange,
    ServerContextSource,
    TlsPeer,
    subject_matches,
    tls_peer,
)
from dicom_node.net.tls_listener import start_tls_server
from dicom_node.states import AssociationResult, CheckSeverity, Listener, StoreResult
from dicom_node.storage.store import Store

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


@dataclass
class _AssocStats:
    """Counters of one association, for its summary log line."""

    peer: str
    calling_aet: str = "?"
    outcome: str = "closed"
    requested: bool = False
    instances: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    started: float = 0.0
    listener: Listener = Listener.PLAIN
    tls: TlsPeer | None = None
    transfers: audit.Transfers = field(default_factory=audit.Transfers)


def _peer(assoc: Any) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


class StorageSCP:
    """pynetdicom server bound to one :class:`Store`; reconfigurable while running."""

    def __init__(self, config: NodeConfig, store: Store) -> None:
        """Prepare the application entity from ``config`` (nothing listens until start())."""
        self._config = config
        self._store = store
        self._server: Any = None
        self._tls_server: Any = None
        self._tls_source = self._make_tls_source(config)
        self._stats: dict[int, _AssocStats] = {}
        self._stats_lock = threading.Lock()
        ae = AE(ae_title=config.node.ae_title)
        ae.add_supported_context(VERIFICATION, list(UNCOMPRESSED[:3]))
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(STORAGE_PREFERENCE))
        timeout = config.node.network_timeout_seconds
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.maximum_pdu_size = MAX_PDU_SIZE
        self._ae = ae
        self._apply(config)

    # -- configuration -------------------------------------------------------------------
    def _apply(self, config: NodeConfig) -> None:
        self._ae.maximum_associations = config.node.max_associations
        self._ae.require_calling_aet = list(config.node.allowed_calling_aets)
        self._ae.ae_title = config.node.ae_title
        for server in self._listeners():
            server.ae_title = config.node.ae_title
        self._config = config

    def reload(self, config: NodeConfig) -> None:
        """Apply a new config: allow-list, own AE title, association limit (no restart)."""
        old = self._config
        self._apply(config)
        if self._tls_source is not None and config.node.tls is not None:
            self._tls_source.update(config.node.tls)
        if old.node.allowed_calling_aets != config.node.allowed_calling_aets:
            if config.node.allowed_calling_aets:
                log.info(
                    "allowed calling AE titles now: %s",
                    ", ".join(config.node.allowed_calling_aets),
                )
            else:
                log.warning("node.allowed_calling_aets is empty: any calling AE may store")

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
        if node.port is not None:
            self._server = self._listen(node.port, self._handlers())
        if node.tls is not None and self._tls_source is not None:
            self._tls_server = self._listen(node.tls.port, self._handlers(), tls=True)
            self._tls_source.start()
        if not node.allowed_calling_aets:
            log.warning("node.allowed_calling_aets is empty: any calling AE may store to this node")
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
        """Number of associations in progress (both listeners)."""
        return sum(len(s.active_associations) for s in self._listeners())

    def stop(self, graceful: bool = True, timeout: float | None = None) -> bool:
        """Stop listening; if graceful, let in-flight associations finish (up to ``timeout``).

        Returns True when no association had to be aborted.
        """
        servers = self._listeners()
        self._server = self._tls_server = None
        if self._tls_source is not None:
            self._tls_source.stop()
        if not servers:
            return True
        for server in servers:
            server.shutdown()  # closes the listening socket: no new associations
        if timeout is None:
            timeout = self._config.node.shutdown_timeout_seconds
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        active = []
        for assoc in [a for server in servers for a in server.active_associations]:
            with self._stats_lock:
                stats = self._stats.get(id(assoc))
            if stats is not None and stats.requested:
                active.append(assoc)
            else:  # a connection that never asked for an association: nothing in flight
                assoc.abort()
        if active:
            log.info("waiting for %d association(s) to finish", len(active))
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
        remaining = [a for a in active if a.is_alive()]
        for assoc in remaining:
            log.warning("aborting association from %s at shutdown", _peer(assoc))
            assoc.abort()
        log.info("listener stopped")
        return not remaining

    # -- event handlers (run in association threads) ------------------------------------
    def _stats_for(self, assoc: Any) -> _AssocStats:
        with self._stats_lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                stats = _AssocStats(peer=_peer(assoc), started=time.monotonic())
                self._stats[id(assoc)] = stats
            return stats

    def _on_open(self, event: Any) -> None:
        self._note_tls(event.assoc, self._stats_for(event.assoc))

    def _on_requested(self, event: Any) -> None:
        stats = self._stats_for(event.assoc)
        stats.requested = True
        self._check_binding(event.assoc, stats)

    def _on_outcome(self, event: Any, outcome: str) -> None:
        stats = self._stats_for(event.assoc)
        if outcome in ("accepted", "rejected"):
            stats.calling_aet = str(event.assoc.requestor.ae_title).strip()
        if outcome == "rejected":
            reason = _reject_reason(event.assoc)
            metrics.association_ended(AssociationResult.REJECTED)
            log.warning(
                "association from AE %r at %s rejected: %s", stats.calling_aet, stats.peer, reason
            )
            self._audit_start(stats, accepted=False, reason=reason)
        elif outcome == "accepted":
            self._audit_start(stats, accepted=True, reason="accepted")
        stats.outcome = outcome

    def _on_close(self, event: Any) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None or stats.outcome == "rejected":
            return
        if not stats.requested:
            log.debug("connection from %s closed without an association request", stats.peer)
            # pynetdicom's acceptor would otherwise keep waiting for the A-ASSOCIATE-RQ until
            # the ACSE timeout, holding one of node.max_associations slots: TCP health checks
            # and port probes must not block real senders. An empty item ends that wait the
            # same way the timeout does (Association.run_reactor: primitive None -> kill()).
            queue = getattr(getattr(event.assoc, "dul", None), "to_user_queue", None)
            if queue is not None:
                queue.put(None)
            return
        outcome = "released" if stats.outcome == "accepted" else stats.outcome
        released = outcome == AssociationResult.RELEASED
        metrics.association_ended(
            AssociationResult.RELEASED if released else AssociationResult.ABORTED
        )
        level = logging.INFO if outcome == "released" and not stats.failed else logging.WARNING
        log.log(
            level,
            "association from AE %r at %s: %d instances stored (%d duplicates), %d failed, "
            "%.1f MB in %.2f s, %s",
            stats.calling_aet,
            stats.peer,
            stats.instances,
            stats.duplicates,
            stats.failed,
            stats.bytes / 1e6,
            time.monotonic() - stats.started,
            outcome,
        )
        self._audit_end(stats, outcome)

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int:
        stats = self._stats_for(event.assoc)
        t0 = time.perf_counter()
        try:
            encoded = event.encoded_dataset(include_meta=True)
            stored = self._store.store_encoded(
                encoded, calling_aet=stats.calling_aet, peer=stats.peer
            )
        except NodeError as exc:
            stats.failed += 1
            metrics.instance_received(StoreResult.FAILED, time.perf_counter() - t0)
            log.warning(
                "C-STORE from AE %r at %s failed with status 0x%04X: %s",
                stats.calling_aet,
                stats.peer,
                exc.status,
                exc,
            )
            return exc.status
        except Exception:
            stats.failed += 1
            metrics.instance_received(StoreResult.FAILED, time.perf_counter() - t0)
            log.exception(
                "C-STORE from AE %r at %s: unexpected error", stats.calling_aet, stats.peer
            )
            return STATUS_PROCESSING_FAILURE
        result = StoreResult.DUPLICATE if stored.duplicate else StoreResult.STORED
        metrics.instance_received(result, time.perf_counter() - t0, stored.size)
        stats.instances += 1
        stats.bytes += stored.size
        stats.transfers.add(
            stored.study_instance_uid,
            stored.sop_class_uid,
            patient_id=stored.patient_id,
            issuer=stored.issuer_of_patient_id,
            duplicate=stored.duplicate,
        )
        if stored.duplicate:
            stats.duplicates += 1
        return 0x0000

    # -- TLS: the listener's context, the calling-AE/certificate binding (issue #12) --------
    def _make_tls_source(self, config: NodeConfig) -> ServerContextSource | None:
        if config.node.tls is None:
            return None
        source = ServerContextSource(config.node.tls, on_change=self._on_certificate_change)
        _log_certificate_findings(config.node.tls)
        return source

    def _note_tls(self, assoc: Any, stats: _AssocStats) -> None:
        sock = getattr(getattr(assoc, "dul", None), "socket", None)
        stats.tls = tls_peer(getattr(sock, "socket", None))
        stats.listener = Listener.TLS if stats.tls is not None else Listener.PLAIN

    def _binding_refusal(self, calling: str, stats: _AssocStats) -> str | None:
        """Why ``calling`` may not use this connection under node.tls.calling_aet_subjects."""
        tls = self._config.node.tls
        bound = tls.calling_aet_subjects if tls is not None else {}
        if not bound:
            return None
        if stats.tls is None:
            if calling in bound:
                return f"calling AE {calling!r} is bound to a certificate: it must use TLS"
            return None
        if calling not in bound:
            return f"calling AE {calling!r} is not in node.tls.calling_aet_subjects"
        if not subject_matches(bound[calling], stats.tls.certificate):
            return f"certificate {stats.tls.subject!r} is not bound to calling AE {calling!r}"
        return None

    def _check_binding(self, assoc: Any, stats: _AssocStats) -> None:
        """Reject (A-ASSOCIATE-RJ: permanent, calling AE not recognised) a calling AE title
        that the presented certificate may not claim; pynetdicom lets EVT_REQUESTED reject."""
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        reason = self._binding_refusal(calling, stats)
        if reason is None:
            return
        stats.calling_aet = calling
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()  # as pynetdicom after its own rejections: the RJ is sent, the DUL ends
        stats.outcome = "rejected"  # pynetdicom fires no EVT_REJECTED for this
        log.warning("association from AE %r at %s rejected: %s", calling, stats.peer, reason)
        self._audit_start(stats, accepted=False, reason=reason)

    def _on_tls_refused(self, peer: str, reason: str) -> None:
        log.warning("TLS connection from %s refused: %s", peer, reason)
        trail = audit.trail(self._config)
        trail.node_authentication_failure(peer=peer, reason=reason, listener=Listener.TLS)

    def _on_certificate_change(self, change: ContextChange) -> None:
        trail = audit.trail(self._config)
        trail.certificate_change(applied=change.applied, reason=change.reason, files=change.files)
        if change.applied and self._tls_source is not None:
            _log_certificate_findings(self._tls_source.config)

    # -- audit records of associations (issue #12) ------------------------------------------
    def _calling(self, stats: _AssocStats) -> audit.Participant:
        address, _, port = stats.peer.rpartition(":")
        subject = stats.tls.subject if stats.tls is not None else None
        return audit.Participant(
            stats.calling_aet, True, "application", address, int(port), tls_subject=subject
        )

    def _audit_start(self, stats: _AssocStats, *, accepted: bool, reason: str) -> None:
        audit.trail(self._config).association_start(
            calling=self._calling(stats),
            called_aet=self._config.node.ae_title,
            accepted=accepted,
            reason=reason,
            listener=stats.listener,
        )

    def _audit_end(self, stats: _AssocStats, how: str) -> None:
        audit.trail(self._config).association_end(
            calling=self._calling(stats),
            called_aet=self._config.node.ae_title,
            how=how,
            transfers=stats.transfers,
            failed=stats.failed,
            listener=stats.listener,
        )


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
