"""The security sections of the config (node.tls, destinations.<NAME>.tls, audit) and the
config watcher's reports of applied and rejected reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import parse_config, read_config_file
from dicom_node.config_security import AUDIT_FILENAME, SYSLOG_PORTS, SyslogSection
from dicom_node.config_watcher import ConfigChange, ConfigWatcher, changed_keys, restart_needed
from dicom_node.errors import ConfigError

TLS = {"port": 2762, "certificate": "tls/node.crt", "private_key": "tls/node.key"}


def parse(data: dict[str, Any], base: Path = Path("/etc/node")) -> Any:
    return parse_config(data, source="test.yaml", base=base)


def test_tls_paths_resolve_against_the_config_folder() -> None:
    cfg = parse(
        {
            "node": {"port": None, "tls": {**TLS, "ca_certificates": "tls/ca.pem"}},
            "destinations": {
                "TPS": {
                    "ae_title": "TPS",
                    "host": "tps",
                    "port": 104,
                    "tls": {"ca_certificates": "ca.pem"},
                }
            },
            "audit": {"file": "../log/audit.jsonl"},
        }
    )
    assert cfg.node.port is None and cfg.node.tls is not None
    assert cfg.node.tls.certificate == Path("/etc/node/tls/node.crt")
    assert cfg.node.tls.require_client_certificate is True
    tps_tls = cfg.destinations["TPS"].tls
    assert tps_tls is not None and tps_tls.ca_certificates == Path("/etc/node/ca.pem")
    assert tps_tls.check_hostname is True
    assert cfg.audit.paths(cfg.storage.root) == (
        Path("/etc/log/audit.jsonl"),
        Path("/etc/log/audit-id.key"),
    )


def test_audit_defaults_under_storage(tmp_path: Path) -> None:
    cfg = parse({"storage": {"root": "data"}}, tmp_path)
    log_file, key_file = cfg.audit.paths(cfg.storage.root)
    assert log_file == tmp_path / "data" / "audit" / AUDIT_FILENAME
    assert key_file.parent == log_file.parent


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node": {"port": None}}, "test.yaml: node: port is null and tls is not set"),
        ({"node": {"tls": TLS}}, "ca_certificates is required while require_client_certificate"),
        ({"node": {"port": 2762, "tls": {**TLS, "require_client_certificate": False}}}, "is also"),
        (
            {"node": {"tls": {**TLS, "ca_certificates": "c", "calling_aet_subjects": {"A": []}}}},
            "list at least one certificate subject",
        ),
        (
            {
                "node": {
                    "tls": {**TLS, "ca_certificates": "c", "calling_aet_subjects": {"A\\B": ["x"]}}
                }
            },
            "not a valid AE title",
        ),
        (
            {
                "destinations": {
                    "X": {
                        "ae_title": "X",
                        "host": "h",
                        "port": 1,
                        "tls": {"ca_certificates": "c", "certificate": "a"},
                    }
                }
            },
            "give both certificate and private_key",
        ),
        (
            {"destinations": {"X": {"ae_title": "X", "host": "h", "port": 1, "tls": {}}}},
            "destinations.X.tls.ca_certificates: Field required",
        ),
        ({"audit": {"syslog": {"host": "log"}}}, "transport tls needs ca_certificates"),
        ({"audit": {"syslog": {"host": "log", "transport": "smoke"}}}, "audit.syslog.transport"),
    ],
)
def test_invalid_security_settings_are_named(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(data)
    assert message in str(err.value)
    assert str(err.value).startswith("test.yaml: ")


def test_syslog_ports() -> None:
    for transport, port in SYSLOG_PORTS.items():
        cfg = SyslogSection.model_validate(
            {"host": "h", "transport": transport, "ca_certificates": "c"}
        )
        assert cfg.effective_port == port
    assert SyslogSection(host="h", transport="udp", port=5514).effective_port == 5514


def test_tls_port_change_needs_a_restart() -> None:
    base = parse({"node": {"tls": {**TLS, "require_client_certificate": False}}})
    moved = parse({"node": {"tls": {**TLS, "port": 2763, "require_client_certificate": False}}})
    assert restart_needed(base, moved) == ["node.tls.port"]
    assert restart_needed(base, parse({})) == ["node.tls.port"]
    relaxed = parse(
        {"node": {"tls": {**TLS, "require_client_certificate": False, "calling_aet_subjects": {}}}}
    )
    assert restart_needed(base, relaxed) == []


def test_changed_keys() -> None:
    old = parse({"node": {"allowed_calling_aets": ["A"]}})
    new = parse(
        {
            "node": {"allowed_calling_aets": ["A", "B"]},
            "destinations": {"P": {"ae_title": "P", "host": "h", "port": 1}},
        }
    )
    assert changed_keys(old, new) == ["destinations.P", "node.allowed_calling_aets"]
    assert changed_keys(old, old) == []


def test_watcher_reports_applied_and_rejected_reloads(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node": {"allowed_calling_aets": ["A"]}}))
    watcher = ConfigWatcher(path, read_config_file(path))
    seen: list[ConfigChange] = []
    watcher.on_change(seen.append)
    path.write_text(yaml.safe_dump({"node": {"allowed_calling_aets": ["A", "B"]}}))
    assert not watcher.check() and watcher.check()  # seen twice, then applied
    path.write_text("node:\n  port: 99999\n")
    assert not watcher.check() and not watcher.check()
    assert [c.applied for c in seen] == [True, False]
    assert seen[0].keys == ["node.allowed_calling_aets"] and seen[0].sha256
    assert seen[1].error is not None and "node.port" in seen[1].error
