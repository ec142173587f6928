"""The DICOM listener: Verification and Storage SCP for CT, MR, Enhanced CT, Enhanced MR.

Other SOP classes are refused at association negotiation; who may associate is decided by
:mod:`dicom_node.net.associations` (called and calling AE titles, host pins, a limit on
established associations). Received datasets are streamed by pynetdicom straight into a file
in the store's staging folder (``_config.STORE_RECV_CHUNKED_DATASET``, see
:func:`route_received_files`), so memory does not grow with the instance. Each C-STORE is
one call of :meth:`Store.store_received` on that file (the bytes as received, never
re-encoded), checked against the request's presentation context; a :class:`NodeError` becomes
its DIMSE failure status with an Error Comment saying why. While an instance arrives, the
association is aborted when it runs past twice ``storage.max_instance_mb`` or the disk drops
below ``storage.min_free_mb`` (up to that, a too-large instance is received and refused with
status 0xA701, so the sender can show why). One log line per association.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
)
from pynetdicom import AE, _config, dimse_messages, evt

from dicom_node.config import NodeConfig
from dicom_node.errors import (
    STATUS_PROCESSING_FAILURE,
    NetworkError,
    NodeError,
)
from dicom_node.net.associations import (
    MAX_PENDING_CONNECTIONS,
    AccessPolicy,
    AssociationRecord,
    Associations,
    log_summary,
)
from dicom_node.net.transport import guard_server
from dicom_node.storage.fsutil import unlink_quietly
from dicom_node.storage.store import MB, Expected, Store, StoredInstance

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
ERROR_COMMENT_LENGTH = 64
"""Error Comment is an LO value: at most 64 characters."""
ABORT_FACTOR = 2
"""An instance still arriving at this multiple of ``storage.max_instance_mb`` is aborted."""
WATCH_INTERVAL = 1.0
"""Seconds between two looks at the transfers in progress (size, free disk space)."""
PENDING_HEADROOM = 2 * MAX_PENDING_CONNECTIONS
"""pynetdicom's own association cap sits this far above node.max_associations: it counts
connections still waiting to send their request, which the node counts separately."""


def failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status with its Error Comment."""
    rsp = Dataset()
    rsp.Status = status
    text = "".join(c if " " <= c <= "~" else "?" for c in comment)
    rsp.ErrorComment = text[:ERROR_COMMENT_LENGTH]
    return rsp


class StorageSCP:
    """pynetdicom server bound to one :class:`Store`; reconfigurable while running."""

    def __init__(self, config: NodeConfig, store: Store) -> None:
        """Prepare the application entity from ``config`` (nothing listens until start())."""
        self._config = config
        self._store = store
        self._server: Any = None
        self.associations = Associations()
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self._policy = AccessPolicy.from_config(config.node)
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
        if self._server is not None:
            self._server.ae_title = node.ae_title
        self._config = config

    def reload(self, config: NodeConfig) -> None:
        """Apply a new config: access rules, own AE title, association limit (no restart)."""
        old = self._config.node
        self._apply(config)
        new = config.node
        if (old.allowed_calling_aets, old.calling_aet_hosts) != (
            new.allowed_calling_aets,
            new.calling_aet_hosts,
        ):
            _log_access(config)

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
        route_received_files(self._store.staging)
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
        guard_server(self._server, timeout=node.network_timeout_seconds)
        self._watching.clear()
        self._watcher = threading.Thread(
            target=self._watch_transfers, name="scp-transfer-watch", daemon=True
        )
        self._watcher.start()
        _log_access(self._config)
        log.info(
            "listening as AE %r on %s:%d (max %d associations), storing under %s",
            node.ae_title,
            node.host,
            self.port,
            node.max_associations,
            self._store.root,
        )

    def active_associations(self) -> int:
        """Number of established associations in progress."""
        return self.associations.established

    def stop(self, graceful: bool = True, timeout: float | None = None) -> bool:
        """Stop listening; if graceful, let in-flight associations finish (up to ``timeout``).

        Returns True when no association had to be aborted.
        """
        server, self._server = self._server, None
        if server is None:
            return True
        server.shutdown()  # closes the listening socket: no new associations
        self._watching.set()
        unroute_received_files(self._store.staging)
        if timeout is None:
            timeout = self._config.node.shutdown_timeout_seconds
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        active = []
        for assoc in server.active_associations:
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
            rec = self.associations.record(assoc)
            log.warning("aborting association from %s at shutdown", rec.peer)
            self.associations.node_aborts(assoc, "shutdown")
            assoc.abort()
        log.info("listener stopped")
        return not remaining

    # -- event handlers (run in association threads) ------------------------------------
    def _on_open(self, event: Any) -> None:
        oldest = self.associations.opened(event.assoc)
        if oldest is not None:
            log.warning("too many connections without an association request: dropping one")
            _end_wait_for_request(oldest)

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        refusal = self.associations.admit(assoc, self._policy)
        if refusal is None:
            return
        assoc.acse.send_reject(*refusal.reject)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_outcome(self, event: Any, outcome: str) -> None:
        self.associations.set_outcome(event.assoc, outcome)

    def _on_close(self, event: Any) -> None:
        assoc = event.assoc
        _discard_partial_dataset(assoc)
        rec = self.associations.closed(assoc)
        if rec is None:
            return
        if not rec.requested:
            # pynetdicom's acceptor would otherwise keep waiting for the A-ASSOCIATE-RQ until
            # the ACSE timeout: a closed probe (a TCP health check) ends that wait at once.
            _end_wait_for_request(assoc)
        log_summary(rec, assoc)
        if rec.requested:
            sweep_staging(self._store.staging, self._config.node.network_timeout_seconds)

    def _watch_transfers(self) -> None:
        """Once a second: abort a transfer that runs past twice ``storage.max_instance_mb``, or
        any transfer while the disk is below ``storage.min_free_mb`` (a thread of its own, so
        receiving costs nothing per PDU)."""
        while not self._watching.wait(WATCH_INTERVAL):
            server = self._server
            if server is None:
                continue
            try:
                free: int | None = shutil.disk_usage(self._store.root).free
            except OSError:
                free = None
            for assoc in list(server.active_associations):
                size = _bytes_arriving(assoc)
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
        try:
            stored = store_from_event(
                self._store, event, calling_aet=rec.calling_aet, peer=rec.peer
            )
        except NodeError as exc:
            return self._refused(rec, exc.status, str(exc), exc)
        except Exception as exc:
            log.exception("C-STORE from AE %r at %s: unexpected error", rec.calling_aet, rec.peer)
            return self._refused(rec, STATUS_PROCESSING_FAILURE, "internal error", exc)
        rec.instances += 1
        rec.bytes += stored.size
        rec.duplicates += stored.duplicate
        rec.replaced += stored.replaced
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


def store_from_event(store: Store, event: Any, *, calling_aet: str, peer: str) -> StoredInstance:
    """Store the dataset of a C-STORE event (a Storage SCP's, or a C-GET's sub-operation),
    checked against the event's presentation context: from the file pynetdicom streamed it
    into (``STORE_RECV_CHUNKED_DATASET``, as in ``serve``), else from memory. Raises a
    :class:`NodeError` (its DIMSE status) when refused."""
    try:
        path = event.dataset_path  # the file pynetdicom streamed the dataset into
    except AttributeError:
        path = None
    expected = _expected(event)
    if path is None:
        encoded = event.encoded_dataset(include_meta=True)
        return store.store_encoded(encoded, calling_aet=calling_aet, peer=peer, expected=expected)
    staged = Path(path)
    with _staging_lock:
        _in_use.add(staged)
    try:
        return store.store_received(staged, expected=expected, calling_aet=calling_aet, peer=peer)
    finally:
        unlink_quietly(staged)  # normally renamed into storage already
        with _staging_lock:
            _in_use.discard(staged)


def sweep_staging(staging: Path, idle_seconds: float) -> int:
    """Remove received files no transfer writes to any more: pynetdicom leaves the file of a
    dataset behind when an association ends abnormally mid-transfer. A transfer in progress
    writes at least every ``idle_seconds`` (``node.network_timeout_seconds``, else it is
    aborted); files being stored are skipped. Returns the number removed."""
    cutoff = time.time() - idle_seconds
    removed = 0
    for path in staging.glob("tmp*.dcm"):
        with _staging_lock:
            busy = path in _in_use
        try:
            stale = not busy and path.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if stale:
            unlink_quietly(path)
            removed += 1
    if removed:
        log.warning(
            "removed %d partial transfer(s) left in %s by aborted associations", removed, staging
        )
    return removed


_staging_dirs: list[Path] = []
_in_use: set[Path] = set()
_staging_lock = threading.Lock()


def _received_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's temporary file for a received dataset, made in the staging folder of the
    listener started last in this process (owner-only, as mkstemp makes it)."""
    with _staging_lock:
        folder = _staging_dirs[-1] if _staging_dirs else None
    if folder is not None:
        kwargs.setdefault("dir", folder)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def route_received_files(staging: Path) -> None:
    """Have pynetdicom stream received datasets to files in ``staging`` (on the storage
    disk, so they are renamed into place, never copied; a crash leaves them to the store's
    start-up sweep). pynetdicom makes these files with ``tempfile.NamedTemporaryFile`` in the
    system's temporary folder; its module's name for that function is pointed here (a test
    checks the files really land in ``staging``)."""
    with _staging_lock:
        _staging_dirs.append(staging)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _received_file  # type: ignore[attr-defined]


def unroute_received_files(staging: Path) -> None:
    """Undo :func:`route_received_files` for ``staging`` (a listener stopped)."""
    with _staging_lock:
        if staging in _staging_dirs:
            _staging_dirs.remove(staging)


def _expected(event: Any) -> Expected:
    context = event.context
    request = event.request
    return Expected(
        sop_class_uid=str(context.abstract_syntax),
        transfer_syntax_uid=str(context.transfer_syntax),
        request_sop_class_uid=str(request.AffectedSOPClassUID or ""),
    )


def _end_wait_for_request(assoc: Any) -> None:
    """End pynetdicom's wait for an A-ASSOCIATE-RQ the way its timeout does (Association
    .run_reactor: primitive None -> kill, connection shut down)."""
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if queue is not None:
        queue.put(None)


def _bytes_arriving(assoc: Any) -> int | None:
    """Bytes of the dataset ``assoc`` is receiving now (None when it receives none)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    try:
        return None if handle is None else os.fstat(handle.fileno()).st_size
    except (OSError, ValueError):
        return None


def _discard_partial_dataset(assoc: Any) -> None:
    """Remove the staged file of a dataset whose transfer never completed (aborted)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if handle is not None:
        handle.close()
    if path is not None:
        unlink_quietly(Path(path))


def _log_access(config: NodeConfig) -> None:
    node = config.node
    if node.accepts_any_caller:
        log.warning("node.allowed_calling_aets is ANY: any calling AE may store to this node")
    else:
        log.info("allowed calling AE titles: %s", ", ".join(node.calling_aets))
    for aet, hosts in node.calling_aet_hosts.items():
        log.info("calling AE %r is accepted only from %s", aet, ", ".join(hosts))
