"""Sending over DICOM TLS to a real Orthanc (``DicomTlsEnabled``, client certificate required).

Covers the SCU (echo, send with the audit record), ``dicom-node echo``/``send`` with a TLS
destination, the reasons of failed handshakes, and Orthanc calling the node's TLS port.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import yaml

from dicom_node import audit
from dicom_node.config import ENV_VAR
from dicom_node.config_security import DestinationTls
from dicom_node.errors import EXIT_NETWORK, EXIT_OK, NetworkError, SendError
from dicom_node.net.scu import SendOptions, echo, send_files
from tests.peers import wait_until
from tests.peers.certs import (
    TlsWorld,
    destination_tls_section,
    make_world,
    node_tls_section,
)
from tests.peers.node import NODE_AET, node_command, node_config, start_node
from tests.peers.orthanc import Orthanc, OrthancTls, tls_modality

pytestmark = [pytest.mark.peers]

OrthancFactory = Callable[..., Orthanc]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TlsWorld:
    """Test certificates (openssl, made now)."""
    return make_world(tmp_path_factory.mktemp("certs"))


def tls_orthanc(factory: OrthancFactory, world: TlsWorld, **kwargs: object) -> Orthanc:
    """An Orthanc whose DICOM port speaks TLS only and requires a client certificate."""
    tls = OrthancTls(world.peer.certificate, world.peer.private_key, world.ca.certificate)
    return factory(tls=tls, **kwargs)


def dest_tls(world: TlsWorld, **overrides: object) -> DestinationTls:
    return DestinationTls.model_validate({**destination_tls_section(world), **overrides})


def test_echo_and_send_over_tls_with_audit(
    orthanc_factory: OrthancFactory, world: TlsWorld, ct_files: list[Path], tmp_path: Path
) -> None:
    server = tls_orthanc(orthanc_factory, world)
    tls = dest_tls(world)
    echo(server.destination, calling_aet=NODE_AET, tls=tls)
    trail = audit.AuditTrail(tmp_path / "audit.jsonl", tmp_path / "k.key", source_id=NODE_AET)
    options = SendOptions(calling_aet=NODE_AET, retries=0, tls=tls, audit=trail)
    result = send_files(server.destination, ct_files[:4], options=options)
    assert result.sent == 4 and result.failed == 0
    assert len(server.instances()) == 4
    (record,) = audit.read_log(tmp_path / "audit.jsonl")
    assert record["event"] == "instances-sent" and record["outcome"] == 0
    peer = next(p for p in record["participants"] if p["role"] == "destination")
    assert peer["user_id"] == server.aet and peer["tls_subject"] == world.peer.subject
    study = next(o for o in record["objects"] if o["type"] == "study")
    first = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    assert study["id"] == first.StudyInstanceUID and study["sop_classes"][0]["count"] == 4
    assert str(first.PatientID) not in (tmp_path / "audit.jsonl").read_text()


def test_tls_failures_name_their_reason(
    orthanc_factory: OrthancFactory, world: TlsWorld, ct_files: list[Path]
) -> None:
    server = tls_orthanc(orthanc_factory, world)
    options = SendOptions(calling_aet=NODE_AET, retries=0)
    # plain DICOM to a TLS-only peer: fails, nothing stored
    with pytest.raises(SendError):
        send_files(server.destination, ct_files[:1], options=options)
    # the peer's certificate does not chain to what we trust
    wrong_ca = dest_tls(world, ca_certificates=str(world.other_ca.certificate))
    with pytest.raises(NetworkError, match="certificate verify failed"):
        echo(server.destination, calling_aet=NODE_AET, tls=wrong_ca)
    # no client certificate: Orthanc (DicomTlsRemoteCertificateRequired) refuses us
    anonymous = DestinationTls(ca_certificates=world.ca.certificate)
    with pytest.raises(NetworkError):
        echo(server.destination, calling_aet=NODE_AET, tls=anonymous)
    with pytest.raises(SendError) as err:
        send_files(server.destination, ct_files[:1], options=SendOptions(NODE_AET, 0, tls=wrong_ca))
    assert "certificate verify failed" in str(err.value)
    assert server.instances() == []


def test_host_name_is_checked_unless_switched_off(
    orthanc_factory: OrthancFactory, world: TlsWorld
) -> None:
    elsewhere = world.ca.issue("elsewhere", sans="DNS:elsewhere.example.org")
    tls = OrthancTls(elsewhere.certificate, elsewhere.private_key, world.ca.certificate)
    server = orthanc_factory(tls=tls)
    with pytest.raises(NetworkError, match="mismatch, certificate is not valid"):
        echo(server.destination, calling_aet=NODE_AET, tls=dest_tls(world))
    echo(server.destination, calling_aet=NODE_AET, tls=dest_tls(world, check_hostname=False))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run(
        node_command(*args), capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_cli_echo_and_send_to_a_tls_destination(
    orthanc_factory: OrthancFactory, world: TlsWorld, ct_files: list[Path], tmp_path: Path
) -> None:
    server = tls_orthanc(orthanc_factory, world)
    cfg = node_config(tmp_path)
    cfg["destinations"] = {
        "SECURE": {
            "ae_title": server.aet,
            "host": "127.0.0.1",
            "port": server.dicom_port,
            "tls": destination_tls_section(world),
        },
        "PLAIN": {"ae_title": server.aet, "host": "127.0.0.1", "port": server.dicom_port},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    echoed = run_cli("--config", str(path), "echo", "SECURE", cwd=tmp_path)
    assert echoed.returncode == EXIT_OK, echoed.stdout + echoed.stderr
    assert "over TLS: success" in echoed.stdout
    sent = run_cli("--config", str(path), "send", "SECURE", *map(str, ct_files[:3]), cwd=tmp_path)
    assert sent.returncode == EXIT_OK, sent.stdout + sent.stderr
    assert len(server.instances()) == 3
    plain = run_cli("--config", str(path), "send", "PLAIN", str(ct_files[3]), cwd=tmp_path)
    assert plain.returncode == EXIT_NETWORK
    records = audit.read_log(tmp_path / "storage" / "audit" / "audit.jsonl")
    sends = [r for r in records if r["event"] == "instances-sent"]
    assert [r["outcome"] for r in sends] == [0, 4]
    user = next(p for p in sends[0]["participants"] if p["role"] == "user")
    assert user["requestor"] is True and user["user_id"]


def test_orthanc_stores_to_the_node_over_tls(
    orthanc_factory: OrthancFactory,
    world: TlsWorld,
    ct_files: list[Path],
    tmp_path: Path,
) -> None:
    """A second TLS implementation as the node's caller: Orthanc's C-STORE SCU (DCMTK inside)
    presents its certificate to the node's TLS port."""
    tls_section = node_tls_section(world, calling_aet_subjects={"ORTHANC": ["pacs-peer"]})
    node = start_node(tmp_path, node_config(tmp_path, node={"tls": tls_section}))
    try:
        modality = tls_modality(NODE_AET, "127.0.0.1", int(tls_section["port"]))
        server = tls_orthanc(orthanc_factory, world, config={"DicomModalities": {"NODE": modality}})
        uploaded = [server.post_bytes("/instances", f.read_bytes())["ID"] for f in ct_files[:2]]
        answer = server.post_json("/modalities/NODE/store", {"Resources": uploaded})
        assert answer.get("InstancesCount", len(uploaded)) == 2, answer

        def stored() -> bool:
            return any(
                r["event"] == "instances-received"
                and any(p.get("tls_subject") == world.peer.subject for p in r["participants"])
                for r in node.audit_records()
            )

        wait_until(stored, timeout=20, what="instances received from Orthanc over TLS")
    finally:
        assert node.stop() == 0, node.log_tail()
