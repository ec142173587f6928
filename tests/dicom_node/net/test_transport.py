"""The PDU length guard: an oversized PDU ends the connection before it is read."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import pytest

from dicom_node.net.transport import MAX_RECEIVED_PDU, PduLengthGuard, PduTooLargeError
from tests.peers import wait_until
from tests.peers.node import NodeProcess as Node
from tests.peers.raw_dicom import EXPLICIT_LE, P_DATA_TF, VERIFICATION, RawAssociation, pdu


def test_guard_follows_pdus_across_reads() -> None:
    a, b = socket.socketpair()
    with a, b:
        guard = PduLengthGuard(b, limit=100)
        assert isinstance(guard, socket.socket)  # pynetdicom's isinstance checks still work
        a.sendall(pdu(P_DATA_TF, b"x" * 100) + pdu(P_DATA_TF, b"y" * 10)[:3])
        received = b""
        while len(received) < 106 + 3:
            received += guard.recv(7)  # small reads: headers split across them
        a.sendall(pdu(P_DATA_TF, b"y" * 10)[3:] + struct.pack(">BBL", 4, 0, 101))
        with pytest.raises(PduTooLargeError):
            while True:
                guard.recv(4)
        assert guard.fileno() == b.fileno()


def test_node_closes_on_oversized_pdu(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    with RawAssociation(node.port) as a:
        assert a.associate([(1, VERIFICATION, [EXPLICIT_LE])]).accepted
        a.send(struct.pack(">BBL", P_DATA_TF, 0, 1 << 30) + b"\x00" * 65536)
        assert a.closed_by_node(timeout=10)
    with RawAssociation(node.port) as a:  # before any association: the same
        a.send(struct.pack(">BBL", 1, 0, MAX_RECEIVED_PDU + 1))
        assert a.closed_by_node(timeout=10)
    wait_until(lambda: "over the limit" in node.log(), timeout=10, what="log line")
    assert node.echoscu().returncode == 0
    assert node.stop() == 0
