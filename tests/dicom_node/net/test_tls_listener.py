"""The node's DICOM TLS listener against real DCMTK peers (echoscu/storescu ``+tls``).

Certificates are made by ``openssl`` at test time (tests/peers/certs.py). Every test reads the
node's audit log too: what was accepted or refused, and why, must be on record.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.audit import PATIENT_HASH_PREFIX
from tests.peers import wait_until
from tests.peers.certs import CertAuthority, TlsWorld, make_world, node_tls_section
from tests.peers.dcmtk_tools import echoscu, storescu, tls_options
from tests.peers.node import NODE_AET, NodeProcess, node_config, start_node

pytestmark = [pytest.mark.peers]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TlsWorld:
    """A trusted CA with node, peer and client certificates; another CA with a stranger."""
    return make_world(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, world: TlsWorld) -> Iterator[NodeProcess]:
    """A node with a plain and a TLS port (client certificates required), an allow-list, and
    CT_SIM bound to the ct-sim certificate."""
    workdir = tmp_path_factory.mktemp("tls-node")
    tls = node_tls_section(world, calling_aet_subjects={"CT_SIM": ["ct-sim"]})
    allowed = ["CT_SIM", "MODALITY"]
    node = start_node(
        workdir, node_config(workdir, node={"tls": tls, "allowed_calling_aets": allowed})
    )
    yield node
    assert node.stop() == 0, node.log_tail()


def trusted(world: TlsWorld) -> list[str]:
    """DCMTK options of the trusted client (ct-sim)."""
    return tls_options(world.client.certificate, world.client.private_key, world.ca.certificate)


def events(node: NodeProcess, kind: str, **match: Any) -> list[dict[str, Any]]:
    """Audit records of ``kind`` whose top-level fields equal ``match``."""
    return [
        r
        for r in node.audit_records()
        if r["event"] == kind and all(r.get(k) == v for k, v in match.items())
    ]


def wait_event(
    node: NodeProcess, kind: str, where: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first audit record of ``kind`` for which ``where`` holds (waits for it)."""

    def found() -> dict[str, Any] | None:
        return next((r for r in events(node, kind) if where(r)), None)

    return wait_until(found, timeout=15, what=f"audit record {kind}")


def caller(record: dict[str, Any]) -> dict[str, Any]:
    """The requesting participant of a record."""
    return next(p for p in record["participants"] if p["requestor"])


def test_trusted_client_stores_over_tls_and_is_audited(
    tls_node: NodeProcess, world: TlsWorld, ct_files: list[Path]
) -> None:
    assert tls_node.tls_port is not None
    files = ct_files[:3]
    result = storescu(
        tls_node.tls_port, *files, calling="CT_SIM", called=NODE_AET, extra=trusted(world)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert (tls_node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID).is_dir()

    def ours(r: dict[str, Any]) -> bool:
        return caller(r).get("port") is not None and caller(r)["user_id"] == "CT_SIM"

    start = wait_event(tls_node, "association-start", ours)
    assert start["outcome"] == 0 and start["detail"]["listener"] == "tls"
    assert caller(start)["tls_subject"] == world.client.subject
    assert start["event_id"]["code"] == "110114"
    end = wait_event(tls_node, "association-end", lambda r: r["detail"]["instances"] == 3)
    assert caller(end)["tls_subject"] == world.client.subject
    received = wait_event(
        tls_node,
        "instances-received",
        lambda r: any(o["id"] == first.StudyInstanceUID for o in r["objects"]),
    )
    assert received["event_id"]["code"] == "110104"
    study = next(o for o in received["objects"] if o["type"] == "study")
    assert study["sop_classes"] == [{"uid": str(first.SOPClassUID), "count": 3}]
    patient = next(o for o in received["objects"] if o["type"] == "patient")
    key_file = tls_node.audit_path().parent / "audit-id.key"
    key = bytes.fromhex(key_file.read_text().strip())
    issuer = str(first.get("IssuerOfPatientID", ""))
    expected = hmac.new(key, f"{issuer}\x00{first.PatientID}".encode(), hashlib.sha256)
    assert patient["id"] == PATIENT_HASH_PREFIX + expected.hexdigest()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert tls_node.audit_path().stat().st_mode & 0o777 == 0o600
    text = tls_node.audit_path().read_text()
    assert str(first.PatientName) not in text and str(first.PatientID) not in text


def test_client_certificate_from_another_ca_is_refused(
    tls_node: NodeProcess, world: TlsWorld
) -> None:
    assert tls_node.tls_port is not None
    stranger = tls_options(
        world.stranger.certificate, world.stranger.private_key, world.ca.certificate
    )
    result = echoscu(tls_node.tls_port, calling="CT_SIM", called=NODE_AET, extra=stranger)
    assert result.returncode != 0
    refused = wait_event(
        tls_node,
        "node-authentication-failure",
        lambda r: "certificate verify failed" in r["outcome_text"],
    )
    assert refused["outcome"] == 4 and refused["event_id"]["code"] == "110113"
    assert "refused: certificate verify failed" in tls_node.log()


def test_client_without_certificate_is_refused(tls_node: NodeProcess, world: TlsWorld) -> None:
    assert tls_node.tls_port is not None
    anonymous = tls_options(None, None, world.ca.certificate)
    result = echoscu(tls_node.tls_port, calling="CT_SIM", called=NODE_AET, extra=anonymous)
    assert result.returncode != 0
    wait_event(
        tls_node, "node-authentication-failure", lambda r: "certificate" in r["outcome_text"]
    )


def test_plain_dicom_on_the_tls_port_is_rejected_cleanly(
    tls_node: NodeProcess, world: TlsWorld
) -> None:
    assert tls_node.tls_port is not None
    plain = echoscu(tls_node.tls_port, calling="CT_SIM", called=NODE_AET)
    assert plain.returncode != 0
    # an A-ASSOCIATE-RJ, not a reset connection: the sender can tell what happened
    assert "Association Rejected" in plain.stdout + plain.stderr
    wait_event(tls_node, "node-authentication-failure", lambda r: "plain" in r["outcome_text"])
    # the node keeps serving both ports
    again = echoscu(tls_node.tls_port, calling="CT_SIM", called=NODE_AET, extra=trusted(world))
    assert again.returncode == 0, again.stdout + again.stderr
    assert tls_node.echoscu().returncode == 0
    assert tls_node.proc.poll() is None


def test_silent_connection_does_not_stall_the_tls_listener(
    tls_node: NodeProcess, world: TlsWorld
) -> None:
    assert tls_node.tls_port is not None
    with socket.create_connection(("127.0.0.1", tls_node.tls_port)) as idle:
        idle.settimeout(0.2)
        t0 = time.monotonic()
        result = echoscu(tls_node.tls_port, calling="CT_SIM", called=NODE_AET, extra=trusted(world))
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - t0 < 10


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_profile_tls12_suites_and_no_tls11(tls_node: NodeProcess, world: TlsWorld) -> None:
    """A TLS 1.2 client gets a suite of the BCP 195 non-downgrading list; TLS 1.1 is refused."""
    assert tls_node.tls_port is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(world.ca.certificate)
    ctx.load_cert_chain(world.client.certificate, world.client.private_key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", tls_node.tls_port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.2"
        cipher = tls.cipher()
        assert cipher is not None and cipher[0] == "ECDHE-RSA-AES256-GCM-SHA384"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(world.ca.certificate)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", tls_node.tls_port)) as raw,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(raw, server_hostname="localhost")


def served_certificate(port: int, world: TlsWorld) -> bytes:
    """The DER certificate the node presents now."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(world.ca.certificate)
    ctx.load_cert_chain(world.client.certificate, world.client.private_key)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_tls_only_node_binds_calling_aets_and_follows_renewed_certificates(
    tmp_path: Path, world: TlsWorld
) -> None:
    """``node.port: null`` turns the plain port off; ``calling_aet_subjects`` binds CT_SIM to
    the ct-sim certificate; renewed certificate files apply without a restart."""
    certs = tmp_path / "node-certs"
    certs.mkdir()
    cert, key = certs / "node.crt", certs / "node.key"
    cert.write_bytes(world.node.certificate.read_bytes())
    key.write_bytes(world.node.private_key.read_bytes())
    os.chmod(key, 0o600)
    tls = node_tls_section(
        world,
        certificate=str(cert),
        private_key=str(key),
        calling_aet_subjects={"CT_SIM": [world.client.subject], "PACS": ["pacs-peer"]},
    )
    node = start_node(tmp_path, node_config(tmp_path, node={"port": None, "tls": tls}))
    try:
        _check_bindings(node, world)
        _check_renewal(node, world, cert, key)
        assert "listening as AE 'FUSIONNODE' on 127.0.0.1, port no plain" in node.log()
    finally:
        assert node.stop() == 0, node.log_tail()


def _check_bindings(node: NodeProcess, world: TlsWorld) -> None:
    assert node.tls_port is not None
    port = node.tls_port
    ok = echoscu(port, calling="CT_SIM", called=NODE_AET, extra=trusted(world))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the ct-sim certificate may not claim another AE title
    other = echoscu(port, calling="MR_3T", called=NODE_AET, extra=trusted(world))
    assert other.returncode != 0 and "Association Rejected" in other.stdout + other.stderr
    # the pacs-peer certificate (same CA) may not claim CT_SIM, but is PACS by common name
    peer = tls_options(world.peer.certificate, world.peer.private_key, world.ca.certificate)
    spoof = echoscu(port, calling="CT_SIM", called=NODE_AET, extra=peer)
    assert spoof.returncode != 0
    assert echoscu(port, calling="PACS", called=NODE_AET, extra=peer).returncode == 0
    rejected = wait_event(
        node,
        "association-start",
        lambda r: r["outcome"] == 4 and caller(r)["user_id"] == "CT_SIM",
    )
    assert "not bound to calling AE 'CT_SIM'" in rejected["outcome_text"]
    assert caller(rejected)["tls_subject"] == world.peer.subject


def _check_renewal(node: NodeProcess, world: TlsWorld, cert: Path, key: Path) -> None:
    assert node.tls_port is not None
    port = node.tls_port
    assert served_certificate(port, world) == pem_to_der(world.node.certificate)
    # a half-done renewal (new certificate, old key) is refused: the old one stays in use
    renewed = world.ca.issue("fusion-node-renewed")
    cert.write_bytes(renewed.certificate.read_bytes())
    wait_event(node, "certificate-change", lambda r: r["outcome"] == 4)
    assert served_certificate(port, world) == pem_to_der(world.node.certificate)
    # the key follows: the renewed certificate is served, no restart
    key.write_bytes(renewed.private_key.read_bytes())
    wait_until(
        lambda: served_certificate(port, world) == pem_to_der(renewed.certificate),
        timeout=15,
        what="renewed certificate served",
    )
    applied = wait_event(node, "certificate-change", lambda r: r["outcome"] == 0)
    assert applied["event_id"]["code"] == "110113"
    assert {o["id"] for o in applied["objects"]} >= {str(cert), str(key)}
    ok = echoscu(port, calling="CT_SIM", called=NODE_AET, extra=trusted(world))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_untrusted_node_certificate_fails_the_start(tmp_path: Path, world: TlsWorld) -> None:
    """A key that does not belong to the certificate stops ``serve`` with exit code 78."""
    other = CertAuthority.create(tmp_path / "ca2", "Another CA").issue("x")
    tls = node_tls_section(world, private_key=str(other.private_key))
    node = start_node(tmp_path, node_config(tmp_path, node={"tls": tls}), wait_for_port=False)
    assert node.proc.wait(60) == 78, node.log()
    assert "does not belong to certificate" in node.log()


def test_allow_list_and_bound_titles_on_the_plain_port(tls_node: NodeProcess) -> None:
    """The allow-list applies on both ports; a title bound to a certificate must use TLS."""
    assert tls_node.echoscu(calling="MODALITY").returncode == 0
    unknown = tls_node.echoscu(calling="EVIL")
    assert unknown.returncode != 0
    rejected = wait_event(tls_node, "association-start", lambda r: caller(r)["user_id"] == "EVIL")
    assert rejected["outcome"] == 4 and "node.allowed_calling_aets" in rejected["outcome_text"]
    assert rejected["detail"]["listener"] == "plain"
    spoof = tls_node.echoscu(calling="CT_SIM")
    assert spoof.returncode != 0 and "Association Rejected" in spoof.stdout + spoof.stderr
    bound = wait_event(
        tls_node,
        "association-start",
        lambda r: caller(r)["user_id"] == "CT_SIM" and r["detail"]["listener"] == "plain",
    )
    assert "must use TLS" in bound["outcome_text"]


def test_soon_expiring_certificate_is_warned_at_start(tmp_path: Path, world: TlsWorld) -> None:
    soon = world.ca.issue("short-lived", not_after=datetime.now(UTC) + timedelta(days=10))
    tls = node_tls_section(
        world, certificate=str(soon.certificate), private_key=str(soon.private_key)
    )
    node = start_node(tmp_path, node_config(tmp_path, node={"tls": tls}))
    try:
        assert "TLS node.tls.certificate: certificate" in node.log()
        assert "expires in 9 days" in node.log()
    finally:
        assert node.stop() == 0, node.log_tail()
