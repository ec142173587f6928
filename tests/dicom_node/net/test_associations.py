"""Who may associate, and idle connections that must not lock senders out (real node, real
DCMTK peers, a raw socket peer for what DCMTK will not do)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from dicom_node.config import NodeSection
from dicom_node.net.associations import (
    REJECT_CALLED_AET,
    REJECT_CALLING_AET,
    AccessPolicy,
    Associations,
    peer_address,
)
from tests.peers import wait_until
from tests.peers.node import NODE_AET
from tests.peers.node import NodeProcess as Node
from tests.peers.raw_dicom import EXPLICIT_LE, VERIFICATION, RawAssociation

pytestmark = pytest.mark.peers


def policy(**node: object) -> AccessPolicy:
    return AccessPolicy.from_config(NodeSection.model_validate({"ae_title": "NODE", **node}))


def test_policy_called_and_calling_titles() -> None:
    listed = policy(allowed_calling_aets=["CT_SIM"])
    assert listed.refusal("NODE", "CT_SIM", "10.0.0.1") is None
    refused = listed.refusal("NODE", "INTRUDER", "10.0.0.1")
    assert refused is not None and refused.reject == REJECT_CALLING_AET
    wrong_called = listed.refusal("OTHER", "CT_SIM", "10.0.0.1")
    assert wrong_called is not None and wrong_called.reject == REJECT_CALLED_AET
    assert policy(accept_any_called_aet=True).refusal("OTHER", "ANYONE", "10.0.0.1") is None


def test_policy_host_pins() -> None:
    pinned = policy(
        allowed_calling_aets=["CT_SIM", "PACS"],
        calling_aet_hosts={"CT_SIM": ["10.1.2.3"], "PACS": ["10.9.0.0/16", "localhost"]},
    )
    assert pinned.refusal("NODE", "CT_SIM", "10.1.2.3") is None
    assert pinned.refusal("NODE", "CT_SIM", "::ffff:10.1.2.3") is None  # IPv4-mapped
    assert pinned.refusal("NODE", "CT_SIM", "10.1.2.4") is not None
    assert pinned.refusal("NODE", "PACS", "10.9.200.1") is None
    assert pinned.refusal("NODE", "PACS", "127.0.0.1") is None  # localhost resolved
    assert pinned.refusal("NODE", "PACS", "192.168.0.1") is not None
    assert pinned.refusal("NODE", "CT_SIM", "not-an-address") is not None
    assert peer_address("fe80::1%eth0") is not None


def test_only_established_associations_count() -> None:
    assocs = Associations()
    lim = policy(max_associations=1)

    def fake(calling: str) -> SimpleNamespace:
        primitive = SimpleNamespace(
            calling_ae_title=calling,
            called_ae_title="NODE",
            presentation_context_definition_list=[1],
        )
        requestor = SimpleNamespace(address="127.0.0.1", port=1, primitive=primitive)
        return SimpleNamespace(requestor=requestor)

    idle = [fake("X") for _ in range(5)]
    for conn in idle:
        assocs.opened(conn)
    first, second = fake("A"), fake("B")
    assert assocs.admit(first, lim) is None
    assert assocs.established == 1
    assert assocs.admit(second, lim) is not None  # the limit counts first only
    assocs.closed(first)
    assert assocs.established == 0
    assert assocs.admit(fake("C"), lim) is None


def test_called_ae_title_checked(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    assert node.echoscu().returncode == 0
    wrong = RawAssociation(node.port)
    with wrong:
        result = wrong.associate([(1, VERIFICATION, [EXPLICIT_LE])], called="NOTTHENODE")
    assert result.rejected == REJECT_CALLED_AET
    wait_until(lambda: "to 'NOTTHENODE' rejected" in node.log(), timeout=10, what="log")
    cfg = dict(node.config)
    cfg["node"] = {**cfg["node"], "accept_any_called_aet": True}
    node.write_config(cfg)

    def any_called() -> bool:
        with RawAssociation(node.port) as a:
            accepted = bool(a.associate([(1, VERIFICATION, [EXPLICIT_LE])], called="X").accepted)
            a.release()
            return accepted

    wait_until(any_called, timeout=10, what="promiscuous reload")
    assert node.stop() == 0


def test_calling_ae_pinned_to_host(node_factory: Callable[..., Node]) -> None:
    node = node_factory(
        node={
            "allowed_calling_aets": ["MODALITY", "ELSEWHERE"],
            "calling_aet_hosts": {"ELSEWHERE": ["10.255.255.1"], "MODALITY": ["127.0.0.0/8"]},
        }
    )
    assert node.echoscu("MODALITY").returncode == 0
    refused = node.echoscu("ELSEWHERE")
    assert refused.returncode != 0
    wait_until(lambda: "is not allowed from 127.0.0.1" in node.log(), timeout=10, what="log")
    assert node.stop() == 0


def test_idle_sockets_do_not_lock_senders_out(node_factory: Callable[..., Node]) -> None:
    """max_associations idle TCP connections (no A-ASSOCIATE-RQ): echoscu still gets through
    at once; an established association does hold a slot; idle sockets are dropped after the
    short request timeout."""
    node = node_factory(node={"max_associations": 2, "association_request_timeout_seconds": 2})
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(6)]
    try:
        start = time.monotonic()
        assert node.echoscu().returncode == 0
        assert time.monotonic() - start < 5
        held = [RawAssociation(node.port) for _ in range(2)]
        for a in held:
            assert a.associate([(1, VERIFICATION, [EXPLICIT_LE])]).accepted
        limited = node.echoscu()
        assert limited.returncode != 0, "two established associations fill the limit"
        wait_until(lambda: "associations in progress" in node.log(), timeout=10, what="log")
        for a in held:
            assert a.release()
            a.close()
        wait_until(lambda: node.echoscu().returncode == 0, timeout=10, what="slot freed")
        for sock in idle:  # the node closes them after association_request_timeout_seconds
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    for _ in range(3):  # port probes (health checks) open and close at once
        socket.create_connection(("127.0.0.1", node.port)).close()
    assert node.echoscu().returncode == 0
    assert node.stop() == 0


def test_aborted_association_logged_as_aborted(node_factory: Callable[..., Node]) -> None:
    node = node_factory(node={"network_timeout_seconds": 1})
    with RawAssociation(node.port) as a:
        assert a.associate([(1, VERIFICATION, [EXPLICIT_LE])], calling="SILENT").accepted
        assert a.closed_by_node(timeout=15)  # idle past network_timeout_seconds: node aborts
    wait_until(lambda: "'SILENT'" in node.log(), timeout=10, what="summary line")
    line = next(x for x in node.log().splitlines() if "association from AE 'SILENT'" in x)
    assert "aborted by the node" in line and "released" not in line
    with RawAssociation(node.port) as a:
        assert a.associate([(1, VERIFICATION, [EXPLICIT_LE])], calling="QUITTER").accepted
        a.abort()
    wait_until(lambda: "'QUITTER'" in node.log(), timeout=10, what="summary line")
    line = next(x for x in node.log().splitlines() if "association from AE 'QUITTER'" in x)
    assert "aborted by the peer" in line
    assert node.stop() == 0
    assert NODE_AET
