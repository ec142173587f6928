"""The ``dicom-node`` command: one module per command group, wired together here.

Exit codes (see :mod:`dicom_node.errors`): 0 success, 1 other failure, 2 bad usage,
65 bad data, 69 network failure, 74 storage / I/O failure, 78 configuration error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_node.cli import admin, audit, config, fuse, health, jobs, net, prefetch, series, serve
from dicom_node.errors import EXIT_FAILURE, ConfigError, NodeError

COMMAND_GROUPS = (serve, net, fuse, config, series, jobs, prefetch, audit, admin, health)
"""Modules that register sub-commands (``add_parsers(sub, common)``), in help order."""

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``--config`` and ``-v`` accepted before or after the command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="config file (default: $DICOM_NODE_CONFIG, else config/node.yaml)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    parser = argparse.ArgumentParser(
        prog="dicom-node", parents=[common], description="MR-CT fusion DICOM node"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dicom-node``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)
    args.verbose = getattr(args, "verbose", False)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return exc.exit_code
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # unexpected: show it, exit 1
        logging.getLogger("dicom_node").exception("unexpected error")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
