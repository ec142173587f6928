"""``dicom-node series``: the received series, newest first (Patient ID only on request)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table
from sqlalchemy import select

from dicom_node.cli.common import console, index_sessions, load
from dicom_node.db import redacted_url
from dicom_node.errors import EXIT_OK
from dicom_node.models import Patient, Series, Study

DEFAULT_LIMIT = 100
COLUMNS = (
    "Series UID",
    "Mod",
    "Description",
    "Study date",
    "Inst",
    "Last received (UTC)",
    "From AE",
    "State",
)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``series``."""
    p = sub.add_parser("series", parents=[common], help="list received series")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="rows (default 100)")
    p.add_argument("--modality", help="only this modality (CT, MR)")
    p.add_argument("--show-patient", action="store_true", help="include the Patient ID column")
    p.set_defaults(func=cmd_series)


def cmd_series(args: argparse.Namespace) -> int:
    """Print the index as a table, newest series first."""
    cfg, _ = load(args)
    query = (
        select(Series, Study, Patient)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .order_by(Series.last_received_at.desc())
        .limit(args.limit)
    )
    if args.modality:
        query = query.where(Series.modality == args.modality.upper())
    with index_sessions(cfg) as sessions, sessions() as session:
        rows = session.execute(query).all()
    table = Table(title=f"series in {redacted_url(cfg.database_url)} ({len(rows)} shown)")
    if args.show_patient:
        table.add_column("Patient ID")
    for col in COLUMNS:
        table.add_column(col, justify="right" if col == "Inst" else "left", overflow="fold")
    for series, study, patient in rows:
        cells = [
            series.series_instance_uid,
            series.modality or "",
            series.series_description or "",
            study.study_date or "",
            str(series.number_of_instances),
            series.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
            series.calling_aet,
            series.state,
        ]
        if args.show_patient:
            cells.insert(0, patient.patient_id)
        table.add_row(*cells)
    console().print(table)
    return EXIT_OK
