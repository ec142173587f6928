"""A hand-written DICOM Upper Layer peer over a plain socket: the hostile peer of the tests.

DCMTK and pynetdicom refuse to send malformed data; this sends exactly the bytes it is given
(PS3.8 PDUs, PS3.7 command sets in implicit VR little endian), so tests can put truncated,
mismatched or garbage datasets and broken PDUs on the wire and read the node's answer.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.1234.1"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MAX_PDU = 16384
TIMEOUT = 30.0

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length, body."""
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(
    called: str, calling: str, contexts: list[tuple[int, str, list[str]]], max_pdu: int = MAX_PDU
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` [(id, abstract syntax, [syntaxes])]."""
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT)
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode())
        for ts in syntaxes:
            sub += _item(0x40, ts.encode())
        body += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID)
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", group, elem, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """An implicit VR LE command set with its group length; elements: (element, value)."""
    body = b"".join(_element(0x0000, e, v) for e, v in sorted(elements))
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def c_store_rq(message_id: int, sop_class: bytes, sop_instance: bytes) -> bytes:
    """A C-STORE-RQ command set (a dataset follows)."""
    return command_set(
        [
            (0x0002, sop_class),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, sop_instance),
        ]
    )


def c_echo_rq(message_id: int) -> bytes:
    """A C-ECHO-RQ command set."""
    return command_set(
        [
            (0x0002, VERIFICATION.encode()),
            (0x0100, struct.pack("<H", 0x0030)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements (element number -> value) of an implicit VR LE command set."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        _, elem, length = struct.unpack("<HHL", data[pos : pos + 8])
        out[elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


@dataclass
class Response:
    """A DIMSE response: status and Error Comment."""

    status: int
    comment: str


@dataclass
class Negotiated:
    """What the node answered to the A-ASSOCIATE-RQ."""

    accepted: dict[int, str] = field(default_factory=dict)
    rejected: tuple[int, int, int] | None = None


class RawAssociation:
    """One TCP connection to the node, driven PDU by PDU."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> None:
        """Connect (no association yet)."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.negotiated = Negotiated()
        self._message_id = 0

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body); None when the node closed the connection."""
        try:
            head = self._recv_exact(6)
            if head is None:
                return None
            pdu_type, _, length = struct.unpack(">BBL", head)
            body = self._recv_exact(length)
        except (ConnectionError, TimeoutError):
            return None
        return None if body is None else (pdu_type, body)

    def associate(
        self,
        contexts: list[tuple[int, str, list[str]]],
        *,
        called: str = "FUSIONNODE",
        calling: str = "HOSTILE",
    ) -> Negotiated:
        """Request an association; returns the accepted contexts or the rejection."""
        self.send(associate_rq(called, calling, contexts))
        reply = self.read_pdu()
        if reply is None:
            raise ConnectionError("no answer to the A-ASSOCIATE-RQ")
        pdu_type, body = reply
        if pdu_type == A_ASSOCIATE_RJ:
            self.negotiated.rejected = (body[1], body[2], body[3])
        elif pdu_type == A_ASSOCIATE_AC:
            self.negotiated.accepted = _accepted_contexts(body[68:])
        else:
            raise ConnectionError(f"unexpected PDU 0x{pdu_type:02X} after A-ASSOCIATE-RQ")
        return self.negotiated

    def p_data(self, context_id: int, payload: bytes, *, command: bool, chunk: int = 8192) -> None:
        """Send ``payload`` as PDVs of at most ``chunk`` bytes (the last flagged as last)."""
        parts = [payload[i : i + chunk] for i in range(0, len(payload), chunk)] or [b""]
        for i, part in enumerate(parts):
            flags = (1 if command else 0) | (2 if i == len(parts) - 1 else 0)
            pdv = struct.pack(">LBB", len(part) + 2, context_id, flags) + part
            self.send(pdu(P_DATA_TF, pdv))

    def response(self) -> Response | None:
        """Read PDUs until a complete DIMSE command arrives; None if the node hung up/aborted."""
        command = b""
        while True:
            reply = self.read_pdu()
            if reply is None or reply[0] != P_DATA_TF:
                return None
            body = reply[1]
            pos = 0
            while pos + 6 <= len(body):
                (length,) = struct.unpack(">L", body[pos : pos + 4])
                flags = body[pos + 5]
                command += body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if flags & 3 == 3:
                    elements = parse_command(command)
                    status = struct.unpack("<H", elements.get(0x0900, b"\xff\xff"))[0]
                    comment = elements.get(0x0902, b"").decode("ascii", "replace").strip(" \x00")
                    return Response(status, comment)

    def c_store(
        self,
        context_id: int,
        sop_class: bytes | str,
        sop_instance: bytes | str,
        dataset: bytes,
        *,
        chunk: int = 8192,
    ) -> Response | None:
        """Send one C-STORE-RQ with ``dataset`` (exactly these bytes) and read its response."""
        self._message_id += 1
        cls = sop_class.encode() if isinstance(sop_class, str) else sop_class
        inst = sop_instance.encode() if isinstance(sop_instance, str) else sop_instance
        self.p_data(context_id, c_store_rq(self._message_id, cls, inst), command=True)
        self.p_data(context_id, dataset, command=False, chunk=chunk)
        return self.response()

    def c_echo(self, context_id: int) -> Response | None:
        """Send a C-ECHO-RQ and read its response."""
        self._message_id += 1
        self.p_data(context_id, c_echo_rq(self._message_id), command=True)
        return self.response()

    def release(self) -> bool:
        """A-RELEASE-RQ; True when the node answered A-RELEASE-RP."""
        self.send(pdu(A_RELEASE_RQ, b"\x00" * 4))
        reply = self.read_pdu()
        return reply is not None and reply[0] == A_RELEASE_RP

    def abort(self) -> None:
        """Send an A-ABORT and close."""
        try:
            self.send(pdu(A_ABORT, b"\x00\x00\x00\x00"))
        finally:
            self.close()

    def closed_by_node(self, timeout: float = 10.0) -> bool:
        """True when the node ends the connection (A-ABORT or close) within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                return True
            if not data or data[:1] == bytes([A_ABORT]):
                return True
        return False


def _accepted_contexts(items: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    pos = 0
    while pos + 4 <= len(items):
        item_type, _, length = struct.unpack(">BBH", items[pos : pos + 4])
        body = items[pos + 4 : pos + 4 + length]
        if item_type == 0x21 and body[2] == 0:
            sub = body[4:]
            ts_len = struct.unpack(">H", sub[2:4])[0]
            out[body[0]] = sub[4 : 4 + ts_len].decode().strip("\x00 ")
        pos += 4 + length
    return out
