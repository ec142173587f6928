"""DICOM TLS: SSL contexts from the config, the BCP 195 profile, peer identities.

Both directions use the *Non-downgrading BCP 195 TLS Profile* of DICOM PS3.15 B.10, the way
DCMTK (``+py``, its default) implements it: TLS 1.2 as the minimum, TLS 1.3 with OpenSSL's
default suites, and for TLS 1.2 only the four AEAD suites with forward secrecy listed in
:data:`BCP195_ND_CIPHERS`. Their RSA authentication means that a TLS 1.2 peer needs an RSA
certificate; ECDSA certificates work with TLS 1.3 peers only (``config check`` warns).

A private key must not be encrypted: the node runs unattended and never prompts for a password
(an encrypted key is a :class:`TlsConfigError`). :class:`ServerContextSource` gives the
listener a context that follows changed certificate, key and CA files without a restart.
The offline checks behind ``dicom-node config check`` are in :mod:`dicom_node.net.certs`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.config_security import DestinationTls, TlsServerSection
from dicom_node.errors import TlsConfigError
from dicom_node.polling import PollingThread

log = logging.getLogger(__name__)

PROFILE_NAME = "Non-downgrading BCP 195 TLS Profile"
BCP195_ND_CIPHERS: tuple[tuple[str, str], ...] = (
    ("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "DHE-RSA-AES256-GCM-SHA384"),
    ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384"),
    ("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "DHE-RSA-AES128-GCM-SHA256"),
    ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
)
"""TLS 1.2 suites of the profile as (IANA name, OpenSSL name): the list DCMTK's dcmtls sets for
``TSP_Profile_BCP195_ND``, strongest first (the order DCMTK uses as a server; the server's
order wins, as BCP 195 recommends)."""
CIPHER_STRING = ":".join(openssl for _iana, openssl in BCP195_ND_CIPHERS)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

CONTEXT_CHECK_SECONDS = 1.0
"""How often the listener looks at its certificate files' contents."""

_RFC4514_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
_DN_SPACES = re.compile(r"\s*([,=+])\s*")


def _base_context(*, server: bool) -> ssl.SSLContext:
    """A context with the profile's versions and suites (no certificates yet)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(CIPHER_STRING)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if server:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


def load_identity(ctx: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    """Load a certificate (chain) and its unencrypted private key into ``ctx``."""
    _read(certificate, "certificate")
    _read(private_key, "private key")
    asked: list[bool] = []

    def no_password() -> bytes:
        asked.append(True)
        return b""

    try:
        ctx.load_cert_chain(certificate, private_key, password=no_password)
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        if asked:
            problem = "is encrypted: the node needs an unencrypted key (owner-readable only)"
            raise TlsConfigError(f"private key {private_key} {problem}") from None
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise TlsConfigError(
                f"private key {private_key} does not belong to certificate {certificate}"
            ) from None
        raise TlsConfigError(
            f"cannot load certificate {certificate} with key {private_key}: {reason}"
        ) from None


def load_trust(ctx: ssl.SSLContext, ca_certificates: Path) -> None:
    """Trust the CA certificates of a PEM file (one or more certificates)."""
    _read(ca_certificates, "CA certificates")
    try:
        ctx.load_verify_locations(cafile=str(ca_certificates))
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"CA certificates {ca_certificates}: not PEM certificates ({_ssl_reason(exc)})"
        ) from None


def server_context(cfg: TlsServerSection) -> ssl.SSLContext:
    """The listener's context: the node's certificate, the trusted client CAs, the profile."""
    ctx = _base_context(server=True)
    load_identity(ctx, cfg.certificate, cfg.private_key)
    if cfg.ca_certificates is not None:
        load_trust(ctx, cfg.ca_certificates)
        required = cfg.require_client_certificate
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _RecordingSocket(ssl.SSLSocket):
    """An SSL socket that leaves the reason of a failed handshake on its context."""

    def do_handshake(self, block: bool = False) -> None:
        """Handshake; on failure note why on the :class:`ClientContext` before raising."""
        try:
            super().do_handshake(block)
        except OSError as exc:
            ctx = self.context
            if isinstance(ctx, ClientContext):
                ctx.handshake_error = describe_tls_error(exc)
            raise


class ClientContext(ssl.SSLContext):
    """A client context that remembers why its last handshake failed (pynetdicom logs the
    error but reports only "cannot connect"; a send's failure reason should say more)."""

    sslsocket_class = _RecordingSocket
    handshake_error: str | None = None


def client_context(
    ca_certificates: Path,
    certificate: Path | None = None,
    private_key: Path | None = None,
    *,
    check_hostname: bool = True,
) -> ClientContext:
    """A client context: the peer's certificate verified against ``ca_certificates``, its host
    name checked unless ``check_hostname`` is False, our own certificate if given."""
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(CIPHER_STRING)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    load_trust(ctx, ca_certificates)
    if certificate is not None and private_key is not None:
        load_identity(ctx, certificate, private_key)
    return ctx


def destination_context(tls: DestinationTls) -> ClientContext:
    """The client context for one ``destinations.<NAME>.tls`` entry."""
    return client_context(
        tls.ca_certificates,
        tls.certificate,
        tls.private_key,
        check_hostname=tls.check_hostname,
    )


def describe_tls_error(exc: BaseException) -> str:
    """A short, specific reason for a failed TLS handshake (what an admin can act on)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within the network timeout"
    if isinstance(exc, OSError):
        return f"connection closed during the TLS handshake ({exc.strerror or exc})"
    return str(exc)


# -- peer identities ----------------------------------------------------------------------
def _escape_dn_value(value: str) -> str:
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def subject_dn(peer_cert: dict[str, Any] | None) -> str | None:
    """The subject of a verified peer certificate (``SSLSocket.getpeercert()``) in RFC 4514
    form, most specific first, as ``openssl x509 -noout -subject -nameopt RFC2253`` prints."""
    if not peer_cert or "subject" not in peer_cert:
        return None
    rdns = []
    for rdn in reversed(peer_cert["subject"]):
        parts = [f"{_RFC4514_NAMES.get(k, k)}={_escape_dn_value(str(v))}" for k, v in rdn]
        rdns.append("+".join(parts))
    return ",".join(rdns)


def common_name(peer_cert: dict[str, Any] | None) -> str | None:
    """The (most specific) common name of a peer certificate's subject."""
    if not peer_cert:
        return None
    names = [v for rdn in peer_cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return str(names[-1]) if names else None


def _normal_dn(text: str) -> str:
    return _DN_SPACES.sub(r"\1", text.strip())


def subject_matches(entries: Sequence[str], peer_cert: dict[str, Any] | None) -> bool:
    """Whether a peer certificate's subject is one of ``entries`` (each a common name or a
    whole RFC 4514 subject; see ``node.tls.calling_aet_subjects``)."""
    dn = subject_dn(peer_cert)
    if dn is None:
        return False
    cn = common_name(peer_cert)
    wanted = {_normal_dn(e) for e in entries}
    return _normal_dn(dn) in wanted or (cn is not None and cn in wanted)


@dataclass(frozen=True)
class TlsPeer:
    """What the TLS layer tells about the peer of one connection."""

    subject: str | None
    """RFC 4514 subject of its verified certificate; None without a certificate."""
    version: str | None
    cipher: str | None
    certificate: dict[str, Any] | None


def tls_peer(sock: Any) -> TlsPeer | None:
    """The TLS facts of a connected socket; None for a plain TCP socket."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert() or None
    cipher = sock.cipher()
    return TlsPeer(subject_dn(cert), sock.version(), cipher[0] if cipher else None, cert)


# -- the listener's context, following its files --------------------------------------------
@dataclass(frozen=True)
class ContextChange:
    """The listener's certificate files or settings changed: the outcome of the rebuild."""

    applied: bool
    reason: str
    """What changed (and, when not applied, why the previous context stays in force)."""
    files: tuple[Path, ...]


def _files(cfg: TlsServerSection) -> tuple[Path, ...]:
    found = (cfg.certificate, cfg.private_key, cfg.ca_certificates)
    return tuple(p for p in found if p is not None)


def _signature(cfg: TlsServerSection) -> tuple[str | None, ...]:
    sig: list[str | None] = []
    for path in _files(cfg):
        try:
            sig.append(hashlib.sha256(path.read_bytes()).hexdigest())
        except OSError:
            sig.append(None)
    return tuple(sig)


class ServerContextSource:
    """The listener's SSL context, rebuilt when its certificate, key or CA files change.

    A daemon thread (:meth:`start`) compares the files' contents with those of the current
    context every :data:`CONTEXT_CHECK_SECONDS`. As with the config file, a change counts once
    the same new content was seen on two consecutive polls (so a file caught half-written is
    not loaded); it is then loaded into a new context. If that fails (the certificate replaced
    but not yet its key, say) the previous context stays in force, the error is logged and
    audited once for that content, and the next change of the files is tried again. New
    connections use the newest context; connections already made keep theirs.
    """

    def __init__(
        self,
        cfg: TlsServerSection,
        *,
        on_change: Callable[[ContextChange], None] | None = None,
    ) -> None:
        """Build the first context now (a :class:`TlsConfigError` stops the start-up)."""
        self._lock = threading.Lock()
        self._context = server_context(cfg)
        self._cfg = self._wanted = cfg
        self._signature = _signature(cfg)
        self._pending: tuple[str | None, ...] | None = None
        self._on_change = on_change
        self._poller = PollingThread(self.poll, CONTEXT_CHECK_SECONDS, "tls-watcher")

    @property
    def config(self) -> TlsServerSection:
        """The settings the current context was built from."""
        return self._cfg

    def context(self) -> ssl.SSLContext:
        """The context for a new connection."""
        return self._context

    def update(self, cfg: TlsServerSection) -> bool:
        """Apply reloaded settings (other files, CA, client-certificate policy) at once."""
        with self._lock:
            if cfg == self._wanted:
                return False
            self._wanted, self._signature, self._pending = cfg, _signature(cfg), None
            return self._rebuild(cfg, "settings changed in the config file")

    def poll(self) -> bool:
        """Look at the files once; True when a new context was built from them."""
        with self._lock:
            sig = _signature(self._wanted)
            if sig == self._signature:
                self._pending = None
                return False
            if sig != self._pending:  # first sight of this content: let the writes settle
                self._pending = sig
                return False
            self._signature, self._pending = sig, None
            return self._rebuild(self._wanted, "certificate files changed")

    def _rebuild(self, cfg: TlsServerSection, why: str) -> bool:
        try:
            ctx = server_context(cfg)
        except TlsConfigError as exc:
            log.error("TLS listener: %s, but %s; the previous certificate stays in use", why, exc)
            self._tell(ContextChange(False, f"{why}; rejected: {exc}", _files(cfg)))
            return False
        self._context, self._cfg = ctx, cfg
        log.info("TLS listener: %s; new connections use %s", why, cfg.certificate)
        self._tell(ContextChange(True, why, _files(cfg)))
        return True

    def start(self) -> None:
        """Start watching the files."""
        self._poller.start()

    def stop(self) -> None:
        """Stop watching the files."""
        self._poller.stop()

    def _tell(self, change: ContextChange) -> None:
        if self._on_change is not None:
            try:
                self._on_change(change)
            except Exception:
                log.exception("TLS context change listener failed")
