"""Test certificates made with the ``openssl`` command at test time (never committed).

``CertAuthority.create(folder, "Test CA")`` makes a self-signed RSA CA; :meth:`issue` signs a
leaf certificate for a server (SAN ``DNS:localhost, IP:127.0.0.1`` by default) or a client,
with any validity window (``openssl ca`` takes explicit start and end dates, so already
expired or soon expiring certificates are possible). Keys are unencrypted RSA 2048 files with
mode 600, as the node wants them.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.peers import free_port, require_binary

KEY_BITS = 2048
OPENSSL_TIMEOUT = 60
CA_CONFIG = """\
[ ca ]
default_ca = test_ca
[ test_ca ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
default_md = sha256
policy = any_name
unique_subject = no
copy_extensions = none
[ any_name ]
commonName = supplied
organizationName = optional
organizationalUnitName = optional
"""
SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {sans}
"""
CLIENT_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def openssl(*args: str | Path) -> str:
    """Run ``openssl`` (skip the test when it is missing); raise with its output on failure."""
    exe = require_binary("openssl", "openssl")
    proc = subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=OPENSSL_TIMEOUT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc.stdout


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")


def _new_key(path: Path) -> Path:
    openssl("genrsa", "-out", path, str(KEY_BITS))
    os.chmod(path, 0o600)
    return path


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key (PEM files)."""

    certificate: Path
    private_key: Path
    subject: str
    """The subject as ``openssl x509 -subject -nameopt RFC2253`` prints it (CN first)."""


@dataclass(frozen=True)
class CertAuthority:
    """A test CA in its own folder."""

    folder: Path
    certificate: Path
    private_key: Path
    name: str

    @classmethod
    def create(cls, folder: Path, name: str = "Test CA") -> CertAuthority:
        """A new self-signed CA (10 years) in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "issued").mkdir(exist_ok=True)
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("1000\n")
        (folder / "ca.cnf").write_text(CA_CONFIG.format(dir=folder))
        key = _new_key(folder / "ca.key")
        cert = folder / "ca.crt"
        openssl(
            "req", "-x509", "-new", "-key", key, "-sha256", "-days", "3650", "-subj",
            f"/O=Fusion Node Tests/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", cert,
        )  # fmt: skip
        return cls(folder, cert, key, name)

    def issue(
        self,
        name: str,
        *,
        server: bool = True,
        sans: str = "DNS:localhost,IP:127.0.0.1",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        """Sign a certificate with common name ``name`` (files ``<name>.crt``/``.key``)."""
        now = datetime.now(UTC)
        start = not_before or now - timedelta(hours=1)
        end = not_after or now + timedelta(days=365)
        key = _new_key(self.folder / f"{name}.key")
        csr = self.folder / f"{name}.csr"
        openssl("req", "-new", "-key", key, "-subj", f"/O=Fusion Node Tests/CN={name}", "-out", csr)
        ext = self.folder / f"{name}.ext"
        ext.write_text(SERVER_EXT.format(sans=sans) if server else CLIENT_EXT)
        cert = self.folder / f"{name}.crt"
        openssl(
            "ca", "-batch", "-notext", "-config", self.folder / "ca.cnf", "-cert",
            self.certificate, "-keyfile", self.private_key, "-in", csr, "-out", cert,
            "-startdate", _stamp(start), "-enddate", _stamp(end), "-extfile", ext,
        )  # fmt: skip
        subject = openssl("x509", "-in", cert, "-noout", "-subject", "-nameopt", "RFC2253")
        return Issued(cert, key, subject.strip().removeprefix("subject="))


@dataclass(frozen=True)
class TlsWorld:
    """The certificates of a TLS test: a trusted CA with a node, a peer and a client
    certificate, and a second, untrusted CA with a client certificate of its own."""

    ca: CertAuthority
    node: Issued
    peer: Issued
    client: Issued
    other_ca: CertAuthority
    stranger: Issued


def make_world(folder: Path) -> TlsWorld:
    """Make every certificate a TLS test needs under ``folder``."""
    ca = CertAuthority.create(folder / "ca", "Hospital Test CA")
    other = CertAuthority.create(folder / "other-ca", "Other Test CA")
    return TlsWorld(
        ca=ca,
        node=ca.issue("fusion-node"),
        peer=ca.issue("pacs-peer"),
        client=ca.issue("ct-sim", server=False),
        other_ca=other,
        stranger=other.issue("intruder", server=False),
    )


def node_tls_section(world: TlsWorld, *, port: Any = None, **extra: Any) -> dict[str, Any]:
    """A ``node.tls`` config section with the world's node certificate and trusted CA."""
    return {
        "port": port or free_port(),
        "certificate": str(world.node.certificate),
        "private_key": str(world.node.private_key),
        "ca_certificates": str(world.ca.certificate),
        **extra,
    }


def destination_tls_section(world: TlsWorld, **extra: Any) -> dict[str, Any]:
    """A ``destinations.<NAME>.tls`` section: trust the world's CA, present the node's
    certificate (it is valid for client authentication too)."""
    return {
        "ca_certificates": str(world.ca.certificate),
        "certificate": str(world.node.certificate),
        "private_key": str(world.node.private_key),
        **extra,
    }
