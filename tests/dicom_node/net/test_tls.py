"""SSL contexts of the BCP 195 non-downgrading profile, peer identities, the listener's
certificate watcher: real TLS handshakes over loopback sockets, certificates from openssl."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest

from dicom_node.config_security import DestinationTls, TlsServerSection
from dicom_node.errors import TlsConfigError
from dicom_node.net.tls import (
    BCP195_ND_CIPHERS,
    ContextChange,
    ServerContextSource,
    client_context,
    describe_tls_error,
    destination_context,
    server_context,
    subject_dn,
    subject_matches,
    tls_peer,
)
from tests.peers.certs import TlsWorld, make_world, node_tls_section, openssl


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TlsWorld:
    """Test certificates (openssl, made now)."""
    return make_world(tmp_path_factory.mktemp("certs"))


def server_section(world: TlsWorld, **extra: object) -> TlsServerSection:
    return TlsServerSection.model_validate(node_tls_section(world, **extra))


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[ssl.SSLSocket | BaseException, ssl.SSLSocket | BaseException]:
    """One handshake over a socket pair: each side's socket, or the exception it raised."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    out: dict[str, ssl.SSLSocket | BaseException] = {}

    def serve() -> None:
        try:
            out["server"] = server.wrap_socket(a, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            out["server"] = exc
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        out["client"] = client.wrap_socket(b, server_hostname=hostname)
    except (OSError, ssl.SSLError) as exc:
        out["client"] = exc
        b.close()
    thread.join(15)
    return out["server"], out["client"]


def test_profile_versions_and_suites(world: TlsWorld) -> None:
    ctx = server_context(server_section(world))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 == [openssl_name for _iana, openssl_name in BCP195_ND_CIPHERS]
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    optional = server_context(server_section(world, require_client_certificate=False))
    assert optional.verify_mode == ssl.CERT_OPTIONAL


def test_handshake_identifies_the_client(world: TlsWorld) -> None:
    server = server_context(server_section(world))
    client = client_context(
        world.ca.certificate, world.client.certificate, world.client.private_key
    )
    s, c = handshake(server, client)
    assert isinstance(s, ssl.SSLSocket) and isinstance(c, ssl.SSLSocket)
    peer = tls_peer(s)
    assert peer is not None and peer.subject == world.client.subject
    assert peer.version in ("TLSv1.2", "TLSv1.3")
    assert subject_matches(["ct-sim"], peer.certificate)
    assert subject_matches([world.client.subject.replace(",", ", ")], peer.certificate)
    assert not subject_matches(["pacs-peer", "CN=ct-sim"], peer.certificate)
    assert tls_peer(socket.socket()) is None
    s.close()
    c.close()


def test_client_certificate_of_another_ca_is_refused(world: TlsWorld) -> None:
    server = server_context(server_section(world))
    stranger = client_context(
        world.ca.certificate, world.stranger.certificate, world.stranger.private_key
    )
    s, _c = handshake(server, stranger)
    assert isinstance(s, ssl.SSLError)
    assert "certificate verify failed" in describe_tls_error(s)


def test_client_context_verifies_the_server_and_names_the_reason(world: TlsWorld) -> None:
    server = server_context(server_section(world, require_client_certificate=False))
    wrong_ca = client_context(world.other_ca.certificate)
    _s, c = handshake(server, wrong_ca)
    assert isinstance(c, ssl.SSLCertVerificationError)
    assert wrong_ca.handshake_error is not None
    assert wrong_ca.handshake_error.startswith("certificate verify failed")
    checked = destination_context(DestinationTls(ca_certificates=world.ca.certificate))
    _s, c = handshake(server, checked, hostname="pacs.example.org")
    assert isinstance(c, ssl.SSLCertVerificationError)
    assert "mismatch" in (checked.handshake_error or "")
    unchecked = destination_context(
        DestinationTls(ca_certificates=world.ca.certificate, check_hostname=False)
    )
    _s, c = handshake(server, unchecked, hostname="pacs.example.org")
    assert isinstance(c, ssl.SSLSocket), c


def test_unusable_files_are_config_errors(world: TlsWorld, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="cannot read"):
        server_context(server_section(world, certificate=str(tmp_path / "missing.crt")))
    with pytest.raises(TlsConfigError, match="does not belong to certificate"):
        server_context(server_section(world, private_key=str(world.peer.private_key)))
    locked = tmp_path / "locked.key"
    openssl(
        "pkey", "-in", world.node.private_key, "-aes256", "-passout", "pass:secret", "-out",
        locked,
    )  # fmt: skip
    with pytest.raises(TlsConfigError, match="is encrypted"):  # no password prompt, ever
        server_context(server_section(world, private_key=str(locked)))
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="not PEM certificates"):
        client_context(garbage)


def test_subject_dn_escapes_and_orders_like_openssl() -> None:
    cert = {
        "subject": (
            (("countryName", "NL"),),
            (("organizationName", "St. A, Radiotherapy"),),
            (("commonName", "ct sim "),),
        )
    }
    assert subject_dn(cert) == "CN=ct sim\\ ,O=St. A\\, Radiotherapy,C=NL"
    assert subject_dn({}) is None and subject_dn(None) is None


def test_describe_tls_error_without_ssl_details() -> None:
    assert "network timeout" in describe_tls_error(TimeoutError())
    assert "connection closed" in describe_tls_error(ConnectionResetError(104, "reset"))


def test_context_source_follows_file_changes(world: TlsWorld, tmp_path: Path) -> None:
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    shutil.copy(world.node.certificate, cert)
    shutil.copy(world.node.private_key, key)
    os.chmod(key, 0o600)
    changes: list[ContextChange] = []
    source = ServerContextSource(
        server_section(world, certificate=str(cert), private_key=str(key)),
        on_change=changes.append,
    )
    first = source.context()
    assert not source.poll() and source.context() is first
    # the certificate alone replaced: seen twice, tried, refused; the old context stays
    shutil.copy(world.peer.certificate, cert)
    assert not source.poll()  # first sight: settle
    assert not source.poll()
    assert source.context() is first
    assert [c.applied for c in changes] == [False]
    assert "does not belong" in changes[0].reason
    assert not source.poll()  # the same bad content is not tried again
    # the key follows: the next poll pair loads the pair
    shutil.copy(world.peer.private_key, key)
    assert not source.poll()
    assert source.poll()
    assert source.context() is not first
    assert [c.applied for c in changes] == [False, True]
    assert cert in changes[-1].files and key in changes[-1].files
    # settings from a reloaded config apply at once
    relaxed = server_section(
        world, certificate=str(cert), private_key=str(key), require_client_certificate=False
    )
    assert source.update(relaxed)
    assert source.context().verify_mode == ssl.CERT_OPTIONAL
    assert not source.update(relaxed)
