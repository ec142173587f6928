"""``dicom-node fuse``: fuse a CT and an MR folder offline (no network, no database)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from dicom_node.cli.common import console, load
from dicom_node.errors import EXIT_OK, UsageError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``fuse``."""
    p = sub.add_parser("fuse", parents=[common], help="fuse a CT and an MR series offline")
    p.add_argument("--ct", type=Path, required=True, help="folder of the CT series")
    p.add_argument("--mr", type=Path, required=True, help="folder of the MR series")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fuse)


def cmd_fuse(args: argparse.Namespace) -> int:
    """Offline fusion of a CT and an MR folder into an output folder."""
    from dicom_node.imaging.offline import run_offline
    from dicom_node.logs import setup_logging

    cfg, _ = load(args)
    setup_logging(cfg.logging, verbose=args.verbose)
    for flag, folder in (("--ct", args.ct), ("--mr", args.mr)):
        if not folder.is_dir():
            raise UsageError(f"{flag} {folder}: not a folder")
    result, _paths = run_offline(
        args.ct, args.mr, args.out, config=cfg, progress=not args.no_progress
    )
    out = console()
    table = Table(title=f"fusion written to {args.out}")
    table.add_column("output")
    table.add_column("objects", justify="right")
    for kind, datasets in result.datasets.items():
        table.add_row(str(kind), str(len(datasets)))
    out.print(table)
    for stage, seconds in result.stage_seconds.items():
        out.print(f"{stage}: {seconds:.1f} s")
    for warning in result.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")
    return EXIT_OK
