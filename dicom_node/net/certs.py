"""Offline checks of TLS files for ``dicom-node config check``: certificates as operations.

For the listener and every destination: the files are readable, the private key is PEM, not
encrypted, owner-readable only and belongs to the certificate, the certificate (and its CAs)
are within their validity (an error when expired, a warning within
:data:`~dicom_node.config_security.CERT_EXPIRY_WARNING_DAYS`), the certificate chains to the
configured CAs (signatures checked), and the node can really build its TLS context from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from dicom_node.config_security import CERT_EXPIRY_WARNING_DAYS, DestinationTls, TlsServerSection
from dicom_node.errors import TlsConfigError
from dicom_node.net.tls import PROFILE_NAME, server_context
from dicom_node.states import CheckSeverity


@dataclass(frozen=True)
class Finding:
    """One result of a certificate check: severity, the config key it is about, a sentence."""

    severity: CheckSeverity
    where: str
    message: str


MAX_CHAIN_DEPTH = 8


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chains_to(chain: Sequence[x509.Certificate], cas: Sequence[x509.Certificate]) -> bool:
    """Whether ``chain[0]`` is signed by one of ``cas``, directly or through the
    intermediates in ``chain[1:]`` (signatures checked, not only names)."""
    current, pool = chain[0], list(chain[1:])
    for _ in range(MAX_CHAIN_DEPTH):
        if any(_issued_by(current, ca) for ca in cas):
            return True
        following = next((c for c in pool if _issued_by(current, c)), None)
        if following is None:
            return False
        pool.remove(following)
        current = following
    return False


class _Checker:
    """Collects the findings of one set of TLS files."""

    def __init__(self, where: str, now: datetime | None = None) -> None:
        self.where = where
        self.now = now or datetime.now(UTC)
        self.findings: list[Finding] = []

    def add(self, severity: CheckSeverity, key: str, message: str) -> None:
        self.findings.append(Finding(severity, f"{self.where}.{key}", message))

    def certificates(self, path: Path, key: str) -> list[x509.Certificate]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.add(CheckSeverity.ERROR, key, f"{path}: cannot read: {exc.strerror or exc}")
            return []
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            self.add(CheckSeverity.ERROR, key, f"{path}: no PEM certificate in it")
            return []

    def private_key(self, path: Path, key: str) -> PrivateKeyTypes | None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.add(CheckSeverity.ERROR, key, f"{path}: cannot read: {exc.strerror or exc}")
            return None
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            self.add(CheckSeverity.ERROR, key, f"{path}: encrypted (the node needs it plain)")
            return None
        except (ValueError, UnsupportedAlgorithm):
            self.add(CheckSeverity.ERROR, key, f"{path}: not a PEM private key")
            return None
        if path.stat().st_mode & 0o077:
            self.add(CheckSeverity.WARNING, key, f"{path}: readable by others (chmod 600)")
        return loaded

    def validity(self, cert: x509.Certificate, key: str, label: str) -> None:
        after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
        left = after - self.now
        if before > self.now:
            self.add(CheckSeverity.ERROR, key, f"{label} is not valid before {before:%Y-%m-%d}")
        elif left.total_seconds() <= 0:
            self.add(CheckSeverity.ERROR, key, f"{label} expired on {after:%Y-%m-%d}")
        elif left < timedelta(days=CERT_EXPIRY_WARNING_DAYS):
            self.add(
                CheckSeverity.WARNING,
                key,
                f"{label} expires in {left.days} days ({after:%Y-%m-%d}): renew it",
            )

    def identity(self, certificate: Path, private_key: Path) -> list[x509.Certificate]:
        """Readable, key matches, dates, key type; returns the chain (empty on error)."""
        chain = self.certificates(certificate, "certificate")
        key = self.private_key(private_key, "private_key")
        if not chain or key is None:
            return []
        leaf = chain[0]
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            self.add(
                CheckSeverity.ERROR, "private_key", f"{private_key} does not match {certificate}"
            )
            return []
        self.validity(leaf, "certificate", f"certificate {leaf.subject.rfc4514_string()}")
        for extra in chain[1:]:
            self.validity(extra, "certificate", f"intermediate {extra.subject.rfc4514_string()}")
        if not isinstance(key, rsa.RSAPrivateKey):
            self.add(
                CheckSeverity.WARNING,
                "private_key",
                f"{type(key).__name__.removeprefix('_')} key: under the {PROFILE_NAME} only TLS "
                "1.3 peers can use it (TLS 1.2 suites of the profile need RSA)",
            )
        return chain

    def trust(self, ca_certificates: Path) -> list[x509.Certificate]:
        cas = self.certificates(ca_certificates, "ca_certificates")
        for ca in cas:
            self.validity(ca, "ca_certificates", f"CA {ca.subject.rfc4514_string()}")
        return cas

    def chain(self, chain: list[x509.Certificate], cas: list[x509.Certificate], why: str) -> None:
        """Does our certificate chain to the configured CAs? A warning only: our issuer may
        be another CA than the one we trust for peers; then the peers must trust it."""
        if not chain or not cas:
            return
        leaf = chain[0].subject.rfc4514_string()
        if chains_to(chain, cas):
            self.add(CheckSeverity.OK, "certificate", f"{leaf} chains to ca_certificates")
        else:
            self.add(
                CheckSeverity.WARNING,
                "certificate",
                f"{leaf} does not chain to ca_certificates: {why} must trust its issuer "
                f"({chain[0].issuer.rfc4514_string()})",
            )

    def summary(self, chain: list[x509.Certificate]) -> None:
        if chain and not any(f.severity == CheckSeverity.ERROR for f in self.findings):
            leaf = chain[0]
            self.add(
                CheckSeverity.OK,
                "certificate",
                f"{leaf.subject.rfc4514_string()}, valid until {leaf.not_valid_after_utc:%Y-%m-%d}",
            )


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def check_server_files(
    cfg: TlsServerSection, where: str = "node.tls", now: datetime | None = None
) -> list[Finding]:
    """Check the listener's files: readable, key matches certificate, expiry (error when
    expired, warning within :data:`CERT_EXPIRY_WARNING_DAYS`), chain to ``ca_certificates``,
    and that the node really can build its TLS context from them."""
    check = _Checker(where, now)
    chain = check.identity(cfg.certificate, cfg.private_key)
    cas = check.trust(cfg.ca_certificates) if cfg.ca_certificates is not None else []
    check.chain(chain, cas, "peers")
    if chain:
        try:
            server_context(cfg)
        except TlsConfigError as exc:
            check.add(CheckSeverity.ERROR, "certificate", str(exc))
    check.summary(chain)
    return check.findings


def check_client_files(
    tls: DestinationTls, where: str, now: datetime | None = None
) -> list[Finding]:
    """Check a destination's TLS files: the CA file, and our client certificate if any."""
    check = _Checker(where, now)
    cas = check.trust(tls.ca_certificates)
    if tls.certificate is not None and tls.private_key is not None:
        chain = check.identity(tls.certificate, tls.private_key)
        check.chain(chain, cas, "the destination")
        check.summary(chain)
    elif cas:
        check.add(CheckSeverity.OK, "ca_certificates", f"{len(cas)} CA certificate(s)")
    return check.findings
