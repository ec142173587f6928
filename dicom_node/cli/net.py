"""``dicom-node echo`` and ``dicom-node send``: talk to a configured (or ad hoc) peer."""

from __future__ import annotations

import argparse
import getpass
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.cli.common import destination, load
from dicom_node.errors import EXIT_OK, UsageError

DEFAULT_ECHO_TIMEOUT = 10.0
DEFAULT_SEND_RETRIES = 3


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``echo`` and ``send``."""
    p = sub.add_parser("echo", parents=[common], help="C-ECHO a destination")
    p.add_argument("dest", help="destination name from the config, or AET@host:port")
    p.add_argument("--calling-aet", help="calling AE title (default: node.ae_title)")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_ECHO_TIMEOUT, help="seconds (default 10)"
    )
    p.set_defaults(func=cmd_echo)
    p = sub.add_parser("send", parents=[common], help="C-STORE files or folders to a destination")
    p.add_argument("dest", help="destination name from the config, or AET@host:port")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    p.add_argument("--calling-aet", help="calling AE title (default: node.ae_title)")
    p.add_argument(
        "--retries", type=int, default=DEFAULT_SEND_RETRIES, help="association retries (default 3)"
    )
    p.set_defaults(func=cmd_send)


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a destination."""
    from dicom_node.net.scu import echo

    cfg, _ = load(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    dest = destination(cfg, args.dest)
    calling = args.calling_aet or cfg.node.ae_title
    echo(dest, calling_aet=calling, timeout=args.timeout, tls=dest.tls)
    over = " over TLS" if dest.tls is not None else ""
    print(f"C-ECHO {calling} -> {dest.ae_title}@{dest.host}:{dest.port}{over}: success")
    return EXIT_OK


def expand_paths(paths: Sequence[Path]) -> list[Path]:
    """Files as given, and every regular file below given folders (sorted, hidden skipped)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts)
                )
            )
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files / folders to a destination (one association per series)."""
    from dicom_node import audit
    from dicom_node.net.scu import SendOptions, send_files

    cfg, _ = load(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    dest = destination(cfg, args.dest)
    files = expand_paths(args.paths)
    if not files:
        raise UsageError("no files to send")
    options = SendOptions(
        calling_aet=args.calling_aet or cfg.node.ae_title,
        retries=args.retries,
        tls=dest.tls,
        audit=audit.trail(cfg),
        requested_by=getpass.getuser(),
    )
    try:
        result = send_files(dest, files, options=options)
    finally:
        audit.flush_all()
    print(
        f"sent {result.sent} instance(s) to {dest.ae_title}@{dest.host}:{dest.port} "
        f"in {result.seconds:.1f} s ({result.attempts} association attempt(s))"
    )
    return EXIT_OK
