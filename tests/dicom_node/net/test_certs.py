"""Offline certificate checks of ``config check``: real certificates from openssl, including
expired, soon expiring, mismatched, foreign and look-alike ones."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from dicom_node.config_security import DestinationTls, TlsServerSection
from dicom_node.net.certs import Finding, chains_to, check_client_files, check_server_files
from dicom_node.states import CheckSeverity
from tests.peers.certs import CertAuthority, TlsWorld, make_world, node_tls_section, openssl


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TlsWorld:
    """Test certificates (openssl, made now)."""
    return make_world(tmp_path_factory.mktemp("certs"))


def section(world: TlsWorld, **extra: object) -> TlsServerSection:
    return TlsServerSection.model_validate(node_tls_section(world, **extra))


def of(findings: list[Finding], severity: CheckSeverity) -> list[str]:
    return [f"{f.where}: {f.message}" for f in findings if f.severity == severity]


def test_good_files_pass(world: TlsWorld) -> None:
    findings = check_server_files(section(world))
    assert of(findings, CheckSeverity.ERROR) == []
    assert of(findings, CheckSeverity.WARNING) == []
    oks = of(findings, CheckSeverity.OK)
    assert any("chains to ca_certificates" in m for m in oks)
    assert any("fusion-node" in m and "valid until" in m for m in oks)


def test_expiry_errors_and_warnings(world: TlsWorld) -> None:
    now = datetime.now(UTC)
    soon = world.ca.issue("soon", not_after=now + timedelta(days=10))
    findings = check_server_files(
        section(world, certificate=str(soon.certificate), private_key=str(soon.private_key))
    )
    assert of(findings, CheckSeverity.ERROR) == []
    (warning,) = of(findings, CheckSeverity.WARNING)
    assert warning.startswith("node.tls.certificate:") and "expires in 9 days" in warning
    expired = world.ca.issue(
        "expired", not_before=now - timedelta(days=60), not_after=now - timedelta(days=1)
    )
    findings = check_server_files(
        section(world, certificate=str(expired.certificate), private_key=str(expired.private_key))
    )
    assert any("expired on" in m for m in of(findings, CheckSeverity.ERROR))
    future = world.ca.issue("future", not_before=now + timedelta(days=2))
    findings = check_server_files(
        section(world, certificate=str(future.certificate), private_key=str(future.private_key))
    )
    assert any("not valid before" in m for m in of(findings, CheckSeverity.ERROR))


def test_key_problems(world: TlsWorld, tmp_path: Path) -> None:
    mismatch = check_server_files(section(world, private_key=str(world.peer.private_key)))
    assert any("does not match" in m for m in of(mismatch, CheckSeverity.ERROR))
    open_key = tmp_path / "open.key"
    shutil.copy(world.node.private_key, open_key)
    os.chmod(open_key, 0o644)
    loose = check_server_files(section(world, private_key=str(open_key)))
    assert any("readable by others" in m for m in of(loose, CheckSeverity.WARNING))
    locked = tmp_path / "locked.key"
    openssl("pkey", "-in", world.node.private_key, "-aes256", "-passout", "pass:x", "-out", locked)
    encrypted = check_server_files(section(world, private_key=str(locked)))
    assert any("encrypted" in m for m in of(encrypted, CheckSeverity.ERROR))
    missing = check_server_files(section(world, certificate=str(tmp_path / "none.crt")))
    assert any("cannot read" in m for m in of(missing, CheckSeverity.ERROR))


def test_chain_to_the_configured_ca(world: TlsWorld, tmp_path: Path) -> None:
    foreign = check_server_files(section(world, ca_certificates=str(world.other_ca.certificate)))
    assert of(foreign, CheckSeverity.ERROR) == []
    assert any("does not chain" in m for m in of(foreign, CheckSeverity.WARNING))
    # a CA with the same name but another key: names match, signatures do not
    twin = CertAuthority.create(tmp_path / "twin", world.ca.name)
    leaf = x509.load_pem_x509_certificate(world.node.certificate.read_bytes())
    real_ca = x509.load_pem_x509_certificate(world.ca.certificate.read_bytes())
    twin_ca = x509.load_pem_x509_certificate(twin.certificate.read_bytes())
    assert twin_ca.subject == real_ca.subject
    assert chains_to([leaf], [real_ca]) and not chains_to([leaf], [twin_ca])


def test_ec_key_works_for_tls13_only(world: TlsWorld, tmp_path: Path) -> None:
    key, cert = tmp_path / "ec.key", tmp_path / "ec.crt"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", cert, "-subj", "/CN=ec-node", "-days", "100",
    )  # fmt: skip
    os.chmod(key, 0o600)
    findings = check_server_files(
        section(world, certificate=str(cert), private_key=str(key), ca_certificates=str(cert))
    )
    assert of(findings, CheckSeverity.ERROR) == []
    assert any("only TLS 1.3 peers" in m for m in of(findings, CheckSeverity.WARNING))


def test_destination_files(world: TlsWorld) -> None:
    ca_only = check_client_files(DestinationTls(ca_certificates=world.ca.certificate), "d.tls")
    assert of(ca_only, CheckSeverity.OK) == ["d.tls.ca_certificates: 1 CA certificate(s)"]
    mine = DestinationTls(
        ca_certificates=world.ca.certificate,
        certificate=world.node.certificate,
        private_key=world.node.private_key,
    )
    findings = check_client_files(mine, "destinations.TPS.tls")
    assert of(findings, CheckSeverity.ERROR) == [] and of(findings, CheckSeverity.WARNING) == []
    wrong = check_client_files(
        DestinationTls(ca_certificates=world.node.private_key), "destinations.TPS.tls"
    )
    assert of(wrong, CheckSeverity.ERROR) == [
        f"destinations.TPS.tls.ca_certificates: {world.node.private_key}: no PEM certificate in it"
    ]
