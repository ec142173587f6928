"""The DICOM TLS listener: an association server whose connections shake hands in their own
thread, with the listener's certificate of the moment.

pynetdicom's own TLS server wraps each accepted socket in the thread that accepts
connections, so one client that connects and says nothing would stall every other TLS client
(the accepted socket has no timeout). Here the accept loop only accepts; each connection's
thread then looks at the first byte the client sends:

* ``0x16`` (a TLS handshake record): the handshake runs with ``node.network_timeout_seconds``
  as its deadline, using :meth:`ServerContextSource.context` (so renewed certificate files
  apply to the next connection); a failure (unknown CA, no client certificate, an old
  protocol version) closes that connection only;
* ``0x01`` (a plain A-ASSOCIATE-RQ: a sender that was not switched to TLS): the request is
  read and answered with an A-ASSOCIATE-RJ (permanent, service user, no reason given), so the
  sender reports a clean rejection instead of a reset connection;
* anything else, or nothing: the connection is closed.

Every refusal is reported to ``on_refused(peer, reason)`` (the audit trail and a WARNING).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.net.tls import ServerContextSource, describe_tls_error

log = logging.getLogger(__name__)

TLS_HANDSHAKE_RECORD = 0x16
A_ASSOCIATE_RQ = 0x01
PDU_HEADER = struct.Struct(">BxI")
"""PDU type, reserved byte, PDU length (PS3.8 9.3.1)."""
MAX_PLAIN_REQUEST = 65_536
"""Longest plain A-ASSOCIATE-RQ read before it is rejected (real ones are a few KB)."""
A_ASSOCIATE_RJ_PLAIN = bytes((0x03, 0x00, 0, 0, 0, 4, 0x00, 0x01, 0x01, 0x01))
"""A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): rejected-permanent, DICOM UL service-user, no reason."""

RefusalListener = Callable[[str, str], None]


def _peer(client_address: Any) -> str:
    return f"{client_address[0]}:{client_address[1]}"


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 16_384))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _reject_plain_request(sock: socket.socket) -> None:
    """Read a plain A-ASSOCIATE-RQ and answer it with an A-ASSOCIATE-RJ."""
    with contextlib.suppress(OSError):
        header = _recv_exactly(sock, PDU_HEADER.size)
        if len(header) == PDU_HEADER.size:
            _recv_exactly(sock, min(PDU_HEADER.unpack(header)[1], MAX_PLAIN_REQUEST))
        sock.sendall(A_ASSOCIATE_RJ_PLAIN)


class _TlsRequestHandler(RequestHandler):
    """pynetdicom's request handler, after a TLS handshake on the connection's own thread."""

    server: TlsAssociationServer

    def handle(self) -> None:
        """Secure the connection; on success hand it to pynetdicom as an association."""
        secured = self.server.secure(self.request, self.client_address)
        if secured is None:
            return
        self.request = secured
        super().handle()


class TlsAssociationServer(ThreadedAssociationServer):
    """A pynetdicom association server for DICOM over TLS (see the module docstring)."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None,
        *,
        evt_handlers: list[Any],
        source: ServerContextSource,
        handshake_timeout: float,
        on_refused: RefusalListener,
    ) -> None:
        """Bind and listen (``ssl_context`` must be None: contexts come from ``source``)."""
        if ssl_context is not None:
            raise ValueError("TlsAssociationServer takes its contexts from `source`")
        self.source = source
        self.handshake_timeout = handshake_timeout
        self.on_refused = on_refused
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            None,
            evt_handlers=evt_handlers,
            request_handler=_TlsRequestHandler,
        )

    def secure(self, raw: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        """The connection after a successful TLS handshake, or None (already closed)."""
        peer = _peer(client_address)
        raw.settimeout(self.handshake_timeout)
        try:
            first = raw.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            _close(raw)
            self._refused(peer, describe_tls_error(exc))
            return None
        if not first:  # a port probe: connected and closed without a word
            log.debug("connection from %s to the TLS port closed without data", peer)
            _close(raw)
            return None
        if first[0] != TLS_HANDSHAKE_RECORD:
            plain = first[0] == A_ASSOCIATE_RQ
            if plain:
                _reject_plain_request(raw)
            _close(raw)
            self._refused(peer, "plain DICOM on the TLS port" if plain else "not TLS")
            return None
        return self._handshake(raw, peer)

    def _handshake(self, raw: socket.socket, peer: str) -> ssl.SSLSocket | None:
        try:
            secured = self.source.context().wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as exc:
            _close(raw)
            self._refused(peer, describe_tls_error(exc))
            return None
        try:
            secured.do_handshake()
        except OSError as exc:
            _close(secured)
            self._refused(peer, describe_tls_error(exc))
            return None
        secured.settimeout(None)  # as pynetdicom's plain sockets: the ACSE/DIMSE timeouts rule
        return secured

    def _refused(self, peer: str, reason: str) -> None:
        try:
            self.on_refused(peer, reason)
        except Exception:
            log.exception("TLS refusal listener failed")


def start_tls_server(
    ae: AE,
    address: tuple[str, int],
    *,
    ae_title: str,
    evt_handlers: list[Any],
    source: ServerContextSource,
    handshake_timeout: float,
    on_refused: RefusalListener,
) -> TlsAssociationServer:
    """Listen for DICOM over TLS on ``address`` in a background thread (like
    ``AE.start_server(block=False)``, whose bookkeeping it repeats)."""
    server = ae.make_server(
        address,
        ae_title=ae_title,
        evt_handlers=evt_handlers,
        server_class=TlsAssociationServer,
        source=source,
        handshake_timeout=handshake_timeout,
        on_refused=on_refused,
    )
    assert isinstance(server, TlsAssociationServer)
    stamp = f"{datetime.now():%Y%m%d%H%M%S}"
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"TlsAcceptorServer@{stamp}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it again
    return server
