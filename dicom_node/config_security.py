"""Security sections of the configuration: DICOM TLS in and out, and the audit trail.

Part of :class:`dicom_node.config.NodeConfig` (``node.tls``, ``destinations.<NAME>.tls``,
``audit``); kept in their own module so that the configuration modules stay small. Every
default of these sections lives here. Paths are resolved against the config file's folder by
:func:`dicom_node.config.parse_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from dicom_node.config_base import AETitle, Port, Section, check_ae_title

CERT_EXPIRY_WARNING_DAYS = 30
"""``config check`` and the node warn when a certificate expires within this many days."""

AUDIT_DIRNAME = "audit"
"""Folder under ``storage.root`` of the audit log and its key when no path is configured."""
AUDIT_FILENAME = "audit.jsonl"
AUDIT_KEY_FILENAME = "audit-id.key"

SyslogTransport = Literal["udp", "tcp", "tls"]
SYSLOG_PORTS: dict[str, int] = {"udp": 514, "tcp": 601, "tls": 6514}
"""Registered ports: RFC 5426 (UDP), RFC 6587 (TCP, syslog-conn), RFC 5425 (TLS)."""


def _both_or_neither(certificate: Path | None, private_key: Path | None, where: str) -> None:
    if (certificate is None) != (private_key is None):
        raise ValueError(f"{where}: give both certificate and private_key, or neither")


class TlsServerSection(Section):
    """``node.tls``: the DICOM TLS listener (BCP 195 non-downgrading profile, TLS >= 1.2).

    ``calling_aet_subjects`` binds calling AE titles to certificate subjects: when it is not
    empty, an association on the TLS port must use a calling AE title listed there and present
    a certificate whose subject (its common name, or the whole RFC 4514 distinguished name)
    is one of that title's entries, and the listed titles are refused on the plain port.
    """

    port: Port
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = True
    calling_aet_subjects: dict[AETitle, list[str]] = Field(default_factory=dict)

    @field_validator("calling_aet_subjects")
    @classmethod
    def _subjects(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for aet, subjects in v.items():
            cleaned = [s.strip() for s in subjects if s.strip()]
            if not cleaned:
                raise ValueError(f"calling AE {aet!r}: list at least one certificate subject")
            out[check_ae_title(aet)] = cleaned
        return out

    @model_validator(mode="after")
    def _client_ca(self) -> Self:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "ca_certificates is required while require_client_certificate is true "
                "(the CAs whose client certificates are trusted)"
            )
        if self.calling_aet_subjects and self.ca_certificates is None:
            raise ValueError("calling_aet_subjects needs ca_certificates (verified subjects)")
        return self


class DestinationTls(Section):
    """``destinations.<NAME>.tls``: DICOM TLS to this destination.

    The peer's certificate is always verified against ``ca_certificates``; its host name is
    checked against ``host`` unless ``check_hostname`` is switched off explicitly.
    ``certificate``/``private_key`` are the node's client certificate, for peers that require
    one.
    """

    ca_certificates: Path
    certificate: Path | None = None
    private_key: Path | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> Self:
        _both_or_neither(self.certificate, self.private_key, "tls")
        return self


class SyslogSection(Section):
    """``audit.syslog``: also send every audit record as an RFC 5424 syslog message."""

    host: str
    transport: SyslogTransport = "tls"
    port: Port | None = None
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _tls(self) -> Self:
        if self.transport == "tls" and self.ca_certificates is None:
            raise ValueError("transport tls needs ca_certificates (to verify the collector)")
        _both_or_neither(self.certificate, self.private_key, "syslog")
        return self

    @property
    def effective_port(self) -> int:
        """``port``, else the registered port of the transport."""
        return self.port if self.port is not None else SYSLOG_PORTS[self.transport]


class AuditSection(Section):
    """``audit``: the append-only audit trail (JSON lines, optionally syslog too)."""

    file: Path | None = None
    key_file: Path | None = None
    syslog: SyslogSection | None = None

    def paths(self, storage_root: Path) -> tuple[Path, Path]:
        """The audit log and the patient-ID hashing key actually used (defaults under
        ``storage_root``; the key sits beside the log unless configured)."""
        log_file = self.file or storage_root / AUDIT_DIRNAME / AUDIT_FILENAME
        key_file = self.key_file or log_file.parent / AUDIT_KEY_FILENAME
        return log_file, key_file
