"""The DICOM listener: Verification and Storage SCP for CT, MR, Enhanced CT, Enhanced MR.

Other SOP classes are refused at association negotiation. With a non-empty
``node.allowed_calling_aets`` an unknown calling AE gets an A-ASSOCIATE-RJ. Each C-STORE is one
call of :meth:`Store.store_encoded` on the bytes as received (no decoding, no re-encoding); a
:class:`NodeError` becomes its DIMSE failure status. One INFO line is logged per association.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
)
from pynetdicom import AE, evt

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.errors import STATUS_PROCESSING_FAILURE, NetworkError, NodeError
from dicom_node.states import AssociationResult, StoreResult
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


def _peer(assoc: Any) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


class StorageSCP:
    """pynetdicom server bound to one :class:`Store`; reconfigurable while running."""

    def __init__(self, config: NodeConfig, store: Store) -> None:
        """Prepare the application entity from ``config`` (nothing listens until start())."""
        self._config = config
        self._store = store
        self._server: Any = None
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
        if self._server is not None:
            self._server.ae_title = config.node.ae_title
        self._config = config

    def reload(self, config: NodeConfig) -> None:
        """Apply a new config: allow-list, own AE title, association limit (no restart)."""
        old = self._config
        self._apply(config)
        if old.node.allowed_calling_aets != config.node.allowed_calling_aets:
            if config.node.allowed_calling_aets:
                log.info(
                    "allowed calling AE titles now: %s",
                    ", ".join(config.node.allowed_calling_aets),
                )
            else:
                log.warning("node.allowed_calling_aets is empty: any calling AE may store")

    @property
    def port(self) -> int:
        """The TCP port actually listened on (useful with port 0)."""
        if self._server is None:
            return self._config.node.port
        return int(self._server.server_address[1])

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Listen on node.host:node.port in background threads."""
        node = self._config.node
        handlers: list[Any] = [
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
        try:
            self._server = self._ae.start_server(
                (node.host, node.port),
                block=False,
                evt_handlers=handlers,
                ae_title=node.ae_title,
            )
        except OSError as exc:
            raise NetworkError(f"cannot listen on {node.host}:{node.port}: {exc}") from exc
        if not node.allowed_calling_aets:
            log.warning("node.allowed_calling_aets is empty: any calling AE may store to this node")
        log.info(
            "listening as AE %r on %s:%d (max %d associations), storing under %s",
            node.ae_title,
            node.host,
            self.port,
            node.max_associations,
            self._store.root,
        )

    def active_associations(self) -> int:
        """Number of associations in progress."""
        if self._server is None:
            return 0
        return len(self._server.active_associations)

    def stop(self, graceful: bool = True, timeout: float | None = None) -> bool:
        """Stop listening; if graceful, let in-flight associations finish (up to ``timeout``).

        Returns True when no association had to be aborted.
        """
        server, self._server = self._server, None
        if server is None:
            return True
        server.shutdown()  # closes the listening socket: no new associations
        if timeout is None:
            timeout = self._config.node.shutdown_timeout_seconds
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        active = []
        for assoc in server.active_associations:
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
        self._stats_for(event.assoc)

    def _on_requested(self, event: Any) -> None:
        self._stats_for(event.assoc).requested = True

    def _on_outcome(self, event: Any, outcome: str) -> None:
        stats = self._stats_for(event.assoc)
        if outcome in ("accepted", "rejected"):
            stats.calling_aet = str(event.assoc.requestor.ae_title).strip()
        if outcome == "rejected":
            metrics.association_ended(AssociationResult.REJECTED)
            log.warning(
                "association from AE %r at %s rejected (calling AE not allowed or too many "
                "associations)",
                stats.calling_aet,
                stats.peer,
            )
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
        if stored.duplicate:
            stats.duplicates += 1
        return 0x0000
