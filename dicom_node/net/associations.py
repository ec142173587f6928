"""Who may talk to the node, and the bookkeeping of every connection, in one place.

:class:`AccessPolicy` decides on an A-ASSOCIATE-RQ: the called AE title must be the node's
(unless ``node.accept_any_called_aet``), the calling AE title must be allowed
(``node.allowed_calling_aets``: a list, or ``ANY``), and an AE title pinned in
``node.calling_aet_hosts`` must come from one of its hosts/networks (host names are resolved
when the config is applied). Only *established* associations count against
``node.max_associations``: a TCP connection that has not yet sent its request holds no slot
(it is dropped after ``node.association_request_timeout_seconds``, and the oldest such
connection is dropped at once when more than :data:`MAX_PENDING_CONNECTIONS` wait), so idle
sockets or port scans cannot lock real senders out.

:class:`Associations` keeps one :class:`AssociationRecord` per connection from open to close
and writes the one summary line per association (outcome ``released``, ``aborted by the node``,
``aborted by the peer`` or ``connection lost``). Anything that wants to follow associations
(an audit trail, metrics) can read the records here rather than hooking pynetdicom again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from dicom_node import audit
from dicom_node.config import NodeSection
from dicom_node.net.tls import TlsPeer
from dicom_node.states import Listener

log = logging.getLogger(__name__)

MAX_PENDING_CONNECTIONS = 64
"""Connections that have not sent an A-ASSOCIATE-RQ yet, at most; beyond it the oldest goes."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
REJECT_LIMIT = (0x02, 0x03, 0x02)
REJECT_NO_REASON = (0x01, 0x01, 0x01)


@dataclass(frozen=True)
class Refusal:
    """Why an association request is rejected, and the A-ASSOCIATE-RJ to send."""

    reject: tuple[int, int, int]
    reason: str


def _networks(host: str) -> list[IPNetwork]:
    """The networks a host pin stands for (a host name: each of its addresses)."""
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.error("node.calling_aet_hosts: cannot resolve %r (%s): it matches no peer", host, exc)
        return []
    return [ipaddress.ip_network(str(info[4][0])) for info in infos]


def peer_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class AccessPolicy:
    """The admission rules of one config version (see module docstring)."""

    ae_title: str
    any_called: bool
    any_caller: bool
    callers: frozenset[str]
    pins: dict[str, tuple[IPNetwork, ...]]
    max_associations: int

    @classmethod
    def from_config(cls, node: NodeSection) -> AccessPolicy:
        """The policy of the ``node`` section (host names resolved now)."""
        pins = {
            aet: tuple(net for host in hosts for net in _networks(host))
            for aet, hosts in node.calling_aet_hosts.items()
        }
        return cls(
            ae_title=node.ae_title,
            any_called=node.accept_any_called_aet,
            any_caller=node.accepts_any_caller,
            callers=frozenset(node.calling_aets),
            pins=pins,
            max_associations=node.max_associations,
        )

    def refusal(self, called: str, calling: str, address: str) -> Refusal | None:
        """Why a request from ``calling`` at ``address`` to ``called`` is refused (or None)."""
        if not self.any_called and called != self.ae_title:
            return Refusal(
                REJECT_CALLED_AET, f"called AE title {called!r} is not this node's (node.ae_title)"
            )
        if not self.any_caller and calling not in self.callers:
            return Refusal(
                REJECT_CALLING_AET,
                f"calling AE title {calling!r} is not in node.allowed_calling_aets",
            )
        networks = self.pins.get(calling)
        if networks is not None:
            ip = peer_address(address)
            if ip is None or not any(ip in net for net in networks):
                return Refusal(
                    REJECT_CALLING_AET,
                    f"calling AE title {calling!r} is not allowed from {address} "
                    "(node.calling_aet_hosts)",
                )
        return None


@dataclass
class AssociationRecord:
    """One connection from open to close: who, what was stored, how it ended."""

    peer: str
    address: str
    started: float
    calling_aet: str = "?"
    called_aet: str = "?"
    requested: bool = False
    established: bool = False
    outcome: str = "open"
    refusal: str | None = None
    abort_reason: str | None = None
    instances: int = 0
    duplicates: int = 0
    replaced: int = 0
    failed: int = 0
    bytes: int = 0
    listener: Listener = Listener.PLAIN
    tls: TlsPeer | None = None
    transfers: audit.Transfers = field(default_factory=audit.Transfers)
    counted: int = field(default=0, repr=False)


def _strip(value: Any) -> str:
    return str(value or "").strip()


class Associations:
    """Records of every open connection and the count of established associations."""

    def __init__(self) -> None:
        """No connections yet."""
        self._lock = threading.Lock()
        self._records: dict[int, AssociationRecord] = {}
        self._pending: OrderedDict[int, Any] = OrderedDict()
        self._established = 0

    def record(self, assoc: Any) -> AssociationRecord:
        """The record of ``assoc`` (created on first sight)."""
        with self._lock:
            return self._record(assoc)

    def _record(self, assoc: Any) -> AssociationRecord:
        rec = self._records.get(id(assoc))
        if rec is None:
            address = str(assoc.requestor.address)
            rec = AssociationRecord(
                peer=f"{address}:{assoc.requestor.port}",
                address=address,
                started=time.monotonic(),
            )
            self._records[id(assoc)] = rec
        return rec

    @property
    def established(self) -> int:
        """Associations established and not yet closed."""
        return self._established

    def opened(self, assoc: Any) -> Any | None:
        """A connection opened; returns the oldest waiting connection to drop, if too many."""
        with self._lock:
            self._record(assoc)
            self._pending[id(assoc)] = assoc
            if len(self._pending) > MAX_PENDING_CONNECTIONS:
                _, oldest = self._pending.popitem(last=False)
                return oldest
        return None

    def admit(
        self, assoc: Any, policy: AccessPolicy, refused: Refusal | None = None
    ) -> Refusal | None:
        """Decide on the association request of ``assoc`` (``refused``: a refusal decided
        elsewhere, e.g. the TLS certificate binding); an admitted one takes a slot."""
        primitive = assoc.requestor.primitive
        with self._lock:
            rec = self._record(assoc)
            self._pending.pop(id(assoc), None)
            rec.requested = True
            rec.calling_aet = _strip(getattr(primitive, "calling_ae_title", ""))
            rec.called_aet = _strip(getattr(primitive, "called_ae_title", ""))
            refusal = refused or policy.refusal(rec.called_aet, rec.calling_aet, rec.address)
            if refusal is None and not getattr(
                primitive, "presentation_context_definition_list", None
            ):  # PS3.8 9.3.2: at least one presentation context
                refusal = Refusal(REJECT_NO_REASON, "no presentation context proposed")
            if refusal is None and self._established >= policy.max_associations:
                refusal = Refusal(
                    REJECT_LIMIT,
                    f"{self._established} associations in progress (node.max_associations)",
                )
            if refusal is None:
                rec.established = True
                rec.counted = 1
                self._established += 1
            else:
                rec.refusal = refusal.reason
            return refusal

    def set_outcome(self, assoc: Any, outcome: str) -> None:
        """Record pynetdicom's outcome event (accepted, rejected, released, aborted)."""
        with self._lock:
            rec = self._record(assoc)
            if rec.outcome in ("open", "accepted") or outcome == "aborted":
                rec.outcome = outcome

    def node_aborts(self, assoc: Any, reason: str) -> None:
        """The node is about to abort ``assoc`` for ``reason`` (logged at close)."""
        with self._lock:
            self._record(assoc).abort_reason = reason

    def closed(self, assoc: Any) -> AssociationRecord | None:
        """The connection closed: forget it, free its slot, return its record."""
        with self._lock:
            self._pending.pop(id(assoc), None)
            rec = self._records.pop(id(assoc), None)
            if rec is not None and rec.counted:
                self._established -= rec.counted
                rec.counted = 0
        return rec


def _peer_aborted(assoc: Any) -> bool:
    """An A-ABORT from the peer still queued (it hung up before pynetdicom read it)."""
    try:
        return bool(assoc.acse.is_aborted("a-abort"))
    except Exception:  # an association torn down half-way has no usable ACSE/DUL
        return False


def ending(rec: AssociationRecord, assoc: Any) -> str:
    """How an established association ended, for its summary line."""
    if getattr(assoc, "is_released", False) or rec.outcome == "released":
        return "released"
    if rec.abort_reason is not None:
        return f"aborted by the node ({rec.abort_reason})"
    if rec.outcome == "aborted" or getattr(assoc, "is_aborted", False) or _peer_aborted(assoc):
        by_node = getattr(assoc, "_sent_abort", False)  # pynetdicom's own timeouts abort too
        return "aborted by the node" if by_node else "aborted by the peer"
    return "connection lost"


def log_summary(rec: AssociationRecord, assoc: Any) -> None:
    """The one line per association: INFO when released cleanly, else WARNING."""
    if not rec.requested:
        log.debug("connection from %s closed without an association request", rec.peer)
        return
    if rec.refusal is not None or rec.outcome == "rejected":
        log.warning(
            "association from AE %r at %s to %r rejected: %s",
            rec.calling_aet,
            rec.peer,
            rec.called_aet,
            rec.refusal or "refused by pynetdicom's negotiation",
        )
        return
    how = ending(rec, assoc)
    level = logging.INFO if how == "released" and not rec.failed else logging.WARNING
    log.log(
        level,
        "association from AE %r at %s: %d instances stored (%d duplicates, %d replaced), "
        "%d failed, %.1f MB in %.2f s, %s",
        rec.calling_aet,
        rec.peer,
        rec.instances,
        rec.duplicates,
        rec.replaced,
        rec.failed,
        rec.bytes / 1e6,
        time.monotonic() - rec.started,
        how,
    )
