"""``dicom-node prefetch PATIENT_ID``: find the patient's MR in the PACS and retrieve it now.

Runs the same query, ranking and retrieval as the node's automatic prefetch (see
:mod:`dicom_node.orchestration.prefetch`) for the patient's newest complete, eligible CT, records
it the same way and prints every step: the query, each candidate with its verdict, the choice
and the retrieval. ``--show`` prints what was recorded for the patient's CTs without querying.
With ``prefetch.method: move`` the instances go to the running node (``dicom-node serve``); with
``get`` this command stores them itself, through the node's store.

This prints to the admin's terminal, which may show the Patient ID; nothing here logs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.cli.common import console, index_sessions, load
from dicom_node.config import NodeConfig
from dicom_node.errors import EXIT_NETWORK, EXIT_OK
from dicom_node.models import Prefetch
from dicom_node.states import CtWaitState, PrefetchMethod, PrefetchState

OK_STATES = frozenset({PrefetchState.RETRIEVED, PrefetchState.NOT_FOUND, PrefetchState.SKIPPED})
"""Outcomes of a manual prefetch that exit 0 ("no MR found" is an answer, not an error)."""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``prefetch``."""
    p = sub.add_parser(
        "prefetch",
        parents=[common],
        help="query the PACS (prefetch.source) for a patient's MR and retrieve it",
    )
    p.add_argument("patient_id", metavar="PATIENT_ID", help="PatientID as stored in the index")
    p.add_argument("--issuer", help="IssuerOfPatientID, when several patients share the ID")
    p.add_argument(
        "--show", action="store_true", help="print the recorded prefetches only (no query)"
    )
    p.set_defaults(func=cmd_prefetch)


def cmd_prefetch(args: argparse.Namespace) -> int:
    """``prefetch PATIENT_ID [--issuer I] [--show]``."""
    cfg, _ = load(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.show:
        return show_patient(cfg, args.patient_id, args.issuer)
    return run_prefetch(cfg, args.patient_id, args.issuer)


def run_prefetch(config: NodeConfig, patient_id: str, issuer: str | None) -> int:
    """Run one prefetch for the patient now and print it; exit 0 unless it failed."""
    from dicom_node.orchestration import prefetch
    from dicom_node.storage.store import Store

    with index_sessions(config) as sessions:
        store = None
        if config.prefetch.method == PrefetchMethod.GET:
            store = Store(config.storage.root, sessions, config.storage.min_free_mb)
        try:
            prefetch_id = prefetch.run_manual(sessions, config, store, patient_id, issuer)
        finally:
            if store is not None:
                store.close()
        with sessions() as session:
            row = session.get(Prefetch, prefetch_id)
            assert row is not None
            _print_prefetches([row])
            state = row.state
    if config.prefetch.method == PrefetchMethod.MOVE and state == PrefetchState.RETRIEVED:
        print(
            f"instances were sent by the PACS to AE {config.node.ae_title} (dicom-node serve); "
            "pairing proceeds there once the series is complete"
        )
    return EXIT_OK if state in OK_STATES else EXIT_NETWORK


def show_patient(config: NodeConfig, patient_id: str, issuer: str | None) -> int:
    """Print every recorded prefetch of the patient (with ``issuer``, of that issuer only)."""
    with index_sessions(config) as sessions, sessions() as session:
        query = select(Prefetch).where(Prefetch.patient_id == patient_id).order_by(Prefetch.id)
        if issuer is not None:
            query = query.where(Prefetch.issuer_of_patient_id == issuer)
        rows = list(session.scalars(query).all())
        if not rows:
            print("no prefetch recorded for this patient", file=sys.stderr)
            return EXIT_OK
        _print_prefetches(rows)
    return EXIT_OK


def _print_prefetches(rows: list[Prefetch]) -> None:
    out = console()
    for table in prefetch_tables(rows):
        out.print(table)


def prefetch_tables(rows: list[Prefetch]) -> list[Table]:
    """One table per prefetch: its outcome, then every recorded step with its reason."""
    tables = []
    for row in rows:
        title = (
            f"prefetch {row.id} ({row.trigger}) for CT {row.ct_series_uid} revision "
            f"{row.ct_revision}: {row.state} after {row.attempts} attempt(s), "
            f"{row.method} from {row.source or '-'}"
        )
        table = Table(title=title)
        for col in ("attempt", "when", "step", "series", "detail"):
            table.add_column(col, overflow="fold")
        for ev in row.events:
            table.add_row(
                str(ev.attempt),
                f"{ev.at:%Y-%m-%d %H:%M:%S}",
                ev.kind,
                ev.series_uid or "-",
                ev.detail,
            )
        if row.state.is_open and row.not_before is not None:
            table.caption = f"next attempt {row.not_before:%Y-%m-%d %H:%M:%S} (UTC)"
        tables.append(table)
    return tables


def prefetch_tables_for_ct(session: Session, ct_uid: str) -> list[Table]:
    """The prefetch tables of one CT series (for ``dicom-node jobs show``)."""
    rows = list(
        session.scalars(
            select(Prefetch).where(Prefetch.ct_series_uid == ct_uid).order_by(Prefetch.id)
        ).all()
    )
    return prefetch_tables(rows)


def ct_wait_state(session: Session, ct_uid: str) -> tuple[CtWaitState, Prefetch | None]:
    """How a waiting CT shows in ``dicom-node jobs``, with its newest prefetch: "prefetching"
    while that prefetch may still bring its MR, else "waiting"."""
    row = session.scalars(
        select(Prefetch)
        .where(Prefetch.ct_series_uid == ct_uid)
        .order_by(Prefetch.id.desc())
        .limit(1)
    ).first()
    if row is not None and row.state.is_open:
        return CtWaitState.PREFETCHING, row
    return CtWaitState.WAITING, row
