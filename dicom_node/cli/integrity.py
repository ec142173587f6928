"""``dicom-node verify`` and ``dicom-node reindex``: check and rebuild the index of stored files.

``verify`` is read-only and may run beside a running node. ``reindex`` needs the node stopped
(it takes the storage lock that ``serve`` holds). By default the series it (re)indexes are
recorded as complete without pairing them again, so nothing is fused or sent twice; with
``--pair`` they go through completion and pairing like newly received series.
"""

from __future__ import annotations

import argparse
from typing import Any

from dicom_node.cli.common import console, index_sessions, load
from dicom_node.errors import EXIT_DATA, EXIT_OK


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``verify`` and ``reindex``."""
    p = sub.add_parser(
        "verify", parents=[common], help="check every stored instance (readable, as indexed)"
    )
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "reindex", parents=[common], help="rebuild the index from the stored files (node stopped)"
    )
    p.add_argument(
        "--pair",
        action="store_true",
        help="let reindexed series be completed and paired again (default: recorded complete)",
    )
    p.set_defaults(func=cmd_reindex)


def cmd_verify(args: argparse.Namespace) -> int:
    """List stored instances that are missing, changed or unreadable, and unindexed files."""
    from dicom_node.storage.pixels import PixelLimits
    from dicom_node.storage.verify import verify

    cfg, _ = load(args)
    out = console()
    with index_sessions(cfg) as sessions:
        report = verify(cfg.storage.root, sessions, PixelLimits(cfg.storage.max_rows_columns))
    for p in report.problems:
        out.print(f"PROBLEM  {p.path}: {p.problem}")
    for rel in report.unindexed:
        out.print(f"UNINDEXED  {rel}")
    out.print(
        f"{report.checked} indexed instances checked: {len(report.problems)} with problems, "
        f"{len(report.unindexed)} files without an index row"
    )
    if report.problems:
        out.print(
            "A re-send of an unreadable instance replaces it; `dicom-node reindex` "
            "indexes files without a row and drops rows of missing files."
        )
    return EXIT_OK if report.ok else EXIT_DATA


def cmd_reindex(args: argparse.Namespace) -> int:
    """Index the stored files (see module docstring); exit 65 if some could not be."""
    from dicom_node.models import utcnow
    from dicom_node.orchestration.completion import mark_complete
    from dicom_node.storage.reindex import reindex, storage_lock
    from dicom_node.storage.store import Store

    cfg, _ = load(args)
    out = console()
    with storage_lock(cfg.storage.root, exclusive=True), index_sessions(cfg) as sessions:
        store = Store.from_config(cfg.storage, sessions)
        try:
            report = reindex(store)
            if not args.pair and report.series:
                with sessions() as session:
                    mark_complete(session, report.series, utcnow())
                    session.commit()
        finally:
            store.close()
    for rel, why in report.skipped:
        out.print(f"NOT INDEXED  {rel}: {why}")
    out.print(
        f"{report.checked} files checked: {len(report.added)} indexed, {len(report.updated)} "
        f"re-indexed, {len(report.removed)} rows of missing files removed, "
        f"{len(report.skipped)} not indexable"
    )
    return EXIT_DATA if report.skipped else EXIT_OK
