"""``dicom-node config check``: validate a configuration file before deploying it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dicom_node.config import config_path, read_config_file
from dicom_node.db import redacted_url
from dicom_node.errors import EXIT_OK


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``config check``."""
    p = sub.add_parser("config", parents=[common], help="configuration tools")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    c = csub.add_parser("check", parents=[common], help="validate a config file")
    c.add_argument("path", nargs="?", type=Path, help="file (default: the one serve would use)")
    c.set_defaults(func=cmd_config_check)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a config file; print a summary or the error (exit code 78)."""
    path = args.path or args.config
    resolved, explicit = config_path(path)
    if not explicit and not resolved.exists():
        print(f"no config file at {resolved}: the embedded defaults apply (OK)")
        return EXIT_OK
    cfg = read_config_file(resolved)
    node = cfg.node
    print(f"{resolved}: OK")
    print(
        f"  node: AE {node.ae_title!r} on {node.host}:{node.port}, "
        f"allowed callers: {', '.join(node.allowed_calling_aets) or 'ANY (warning)'}"
    )
    print(f"  storage: {cfg.storage.root} (min free {cfg.storage.min_free_mb} MB)")
    print(f"  database: {redacted_url(cfg.database_url)}")
    for name, dest in cfg.destinations.items():
        routed = " (routed)" if name in cfg.routing.send_to else ""
        print(
            f"  destination {name}: {dest.ae_title}@{dest.host}:{dest.port} "
            f"sends {', '.join(dest.send)}{routed}"
        )
    return EXIT_OK
