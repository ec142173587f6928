"""``dicom-node config check``: validate a configuration file before deploying it.

Besides the file itself it checks every certificate, key and CA file the configuration names
(the TLS listener, each destination's TLS, the audit syslog over TLS): readable, key matches
certificate, chain to the CA, expiry (a warning within 30 days). Errors exit with 78.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig, config_path, read_config_file
from dicom_node.config_security import DestinationTls
from dicom_node.db import redacted_url
from dicom_node.errors import EXIT_CONFIG, EXIT_OK
from dicom_node.states import CheckSeverity


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``config check``."""
    p = sub.add_parser("config", parents=[common], help="configuration tools")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    c = csub.add_parser("check", parents=[common], help="validate a config file")
    c.add_argument("path", nargs="?", type=Path, help="file (default: the one serve would use)")
    c.set_defaults(func=cmd_config_check)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a config file and its TLS files; print a summary or the error (exit 78)."""
    path = args.path or args.config
    resolved, explicit = config_path(path)
    if not explicit and not resolved.exists():
        print(f"no config file at {resolved}: the embedded defaults apply (OK)")
        return EXIT_OK
    cfg = read_config_file(resolved)
    node = cfg.node
    print(f"{resolved}: OK")
    tls = f"TLS port {node.tls.port}" if node.tls else "no TLS"
    print(
        f"  node: AE {node.ae_title!r} on {node.host}, plain port {node.port or 'off'}, {tls}, "
        f"allowed callers: {', '.join(node.allowed_calling_aets) or 'ANY (warning)'}"
    )
    print(f"  storage: {cfg.storage.root} (min free {cfg.storage.min_free_mb} MB)")
    print(f"  database: {redacted_url(cfg.database_url)}")
    print(f"  audit log: {cfg.audit.paths(cfg.storage.root)[0]}")
    for name, dest in cfg.destinations.items():
        routed = " (routed)" if name in cfg.routing.send_to else ""
        over = " over TLS" if dest.tls else ""
        print(
            f"  destination {name}: {dest.ae_title}@{dest.host}:{dest.port}{over} "
            f"sends {', '.join(dest.send)}{routed}"
        )
    return EXIT_CONFIG if check_certificates(cfg) else EXIT_OK


def check_certificates(cfg: NodeConfig) -> int:
    """Print the findings about every TLS file of ``cfg``; returns the number of errors."""
    from dicom_node.net.certs import check_client_files, check_server_files

    findings = []
    if cfg.node.tls is not None:
        findings += check_server_files(cfg.node.tls)
    for name, dest in cfg.destinations.items():
        if dest.tls is not None:
            findings += check_client_files(dest.tls, f"destinations.{name}.tls")
    syslog = cfg.audit.syslog
    if syslog is not None and syslog.ca_certificates is not None:
        files = DestinationTls(
            ca_certificates=syslog.ca_certificates,
            certificate=syslog.certificate,
            private_key=syslog.private_key,
        )
        findings += check_client_files(files, "audit.syslog")
    errors = 0
    for f in findings:
        label = {CheckSeverity.OK: "ok", CheckSeverity.WARNING: "WARNING"}.get(f.severity, "ERROR")
        print(f"  {label} {f.where}: {f.message}")
        errors += f.severity == CheckSeverity.ERROR
    if errors:
        print(f"{errors} certificate problem(s): the node would not work as configured")
    return errors
