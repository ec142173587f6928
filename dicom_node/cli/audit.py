"""``dicom-node audit``: read and verify the audit trail (see docs/audit.md for its format)."""

from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path
from typing import Any

from dicom_node.cli.common import load
from dicom_node.errors import EXIT_DATA, EXIT_OK, UsageError

DEFAULT_TAIL = 20


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``audit verify`` and ``audit tail``."""
    p = sub.add_parser("audit", parents=[common], help="the audit trail")
    asub = p.add_subparsers(dest="audit_cmd", required=True, metavar="ACTION")
    v = asub.add_parser("verify", parents=[common], help="check the log's hash chain")
    v.add_argument("path", nargs="?", type=Path, help="log file (default: the configured one)")
    v.set_defaults(func=cmd_verify)
    t = asub.add_parser("tail", parents=[common], help="print the last records")
    t.add_argument("-n", type=int, default=DEFAULT_TAIL, help="records (default 20)")
    t.add_argument("path", nargs="?", type=Path, help="log file (default: the configured one)")
    t.set_defaults(func=cmd_tail)


def _log_path(args: argparse.Namespace) -> Path:
    if args.path is not None:
        path: Path = args.path
    else:
        cfg, _ = load(args)
        path = cfg.audit.paths(cfg.storage.root)[0]
    if not path.is_file():
        raise UsageError(f"no audit log at {path}")
    return path


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the hash chain; exit 65 when a line was edited, removed or cut short."""
    from dicom_node.audit import verify_log

    path = _log_path(args)
    result = verify_log(path)
    for problem in result.problems:
        print(f"{path}: {problem}")
    verdict = "chain intact" if not result.problems else f"{len(result.problems)} problem(s)"
    print(f"{path}: {result.records} records, {verdict}")
    return EXIT_DATA if result.problems else EXIT_OK


def cmd_tail(args: argparse.Namespace) -> int:
    """One line per record: time, event, outcome, participants, text."""
    path = _log_path(args)
    with path.open("rb") as f:
        lines = deque(f, maxlen=max(1, args.n))
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            print("(unreadable line)")
            continue
        who = ", ".join(p.get("user_id", "?") for p in r.get("participants", []))
        print(
            f"{r.get('time')} {r.get('event')} outcome={r.get('outcome')} [{who}] "
            f"{r.get('outcome_text', '')}"
        )
    return EXIT_OK
