"""A bound on the size of a PDU the node will read, enforced before the PDU is read.

pynetdicom reads each PDU whole into memory, trusting its 4-byte length field: a peer that
announces a 4 GB PDU and keeps sending makes the listener hold it all (and copy it twice).
Peers must not send P-DATA-TF PDUs larger than the maximum the node announced
(:data:`dicom_node.net.scp.MAX_PDU_SIZE`); :class:`PduLengthGuard` wraps each accepted socket
and ends the connection (pynetdicom sees it closed, the association is aborted) as soon as a
PDU header announces more than :data:`MAX_RECEIVED_PDU` bytes, which leaves ample room for
peers that round the maximum up and for large association requests. Accepted sockets also get
a read/write timeout (see :func:`guard_server`).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_RECEIVED_PDU = 4 * 1024 * 1024
PDU_HEADER = 6


class PduTooLargeError(OSError):
    """A PDU header announced more bytes than the node reads in one PDU."""


class PduLengthGuard:
    """A socket proxy that follows the PDU stream and refuses oversized PDUs.

    Everything but ``recv`` is the wrapped socket's (``__class__`` too, so pynetdicom's
    ``isinstance(sock, ssl.SSLSocket)`` check still sees a TLS socket for what it is).
    """

    def __init__(self, sock: socket.socket, limit: int = MAX_RECEIVED_PDU) -> None:
        """Guard ``sock``; PDUs whose length field exceeds ``limit`` end the connection."""
        self._sock = sock
        self._limit = limit
        self._header = bytearray()
        self._remaining = 0

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._sock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv(self, bufsize: int, *flags: int) -> bytes:
        """``socket.recv``, checking each PDU header that passes through."""
        data = self._sock.recv(bufsize, *flags)
        self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self._remaining:
                take = min(self._remaining, len(view) - i)
                self._remaining -= take
                i += take
                continue
            chunk = view[i : i + PDU_HEADER - len(self._header)]
            self._header += chunk
            i += len(chunk)
            if len(self._header) == PDU_HEADER:
                (length,) = struct.unpack(">L", self._header[2:])
                pdu_type = self._header[0]
                self._header.clear()
                if length > self._limit:
                    log.warning(
                        "PDU of type 0x%02X announces %d bytes, over the limit of %d: "
                        "closing the connection",
                        pdu_type,
                        length,
                        self._limit,
                    )
                    raise PduTooLargeError(f"PDU of {length} bytes exceeds {self._limit}")
                self._remaining = length


def guard_server(server: Any, *, timeout: float, limit: int = MAX_RECEIVED_PDU) -> None:
    """Wrap every socket ``server`` (a pynetdicom AssociationServer) accepts from now on.

    Each accepted socket also gets ``timeout`` (``node.network_timeout_seconds``) for its reads
    and writes: pynetdicom leaves accepted sockets blocking, and reads a PDU with blocking
    ``recv`` calls once its first bytes arrived, so a peer that stops in the middle of a PDU
    would hold the connection (and its threads) for ever; with the timeout the read fails and
    pynetdicom treats the connection as closed.
    """
    accept: Callable[[], tuple[socket.socket, Any]] = server.get_request

    def get_request() -> tuple[Any, Any]:
        sock, address = accept()
        sock.settimeout(timeout)
        return PduLengthGuard(sock, limit), address

    server.get_request = get_request
