"""``dicom-node jobs``: list, show, retry and cancel fusion jobs (rich tables on stdout).

These print to the admin's terminal, which may show the Patient ID; nothing here logs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.cli.common import console, index_sessions, load
from dicom_node.cli.prefetch import ct_wait_state, prefetch_tables_for_ct
from dicom_node.config import NodeConfig
from dicom_node.errors import EXIT_OK, EXIT_USAGE
from dicom_node.models import Job, JobStage, PairingDecision, Send, utcnow
from dicom_node.orchestration import jobs, pairing
from dicom_node.states import CtWaitState, JobAction, JobState, PairingOutcome, SendState

DEFAULT_LIMIT = 50
UID_SHOWN = 24
"""Longest UID shown whole in the job list; longer ones show their last characters."""

_STATE_STYLE: dict[str, str] = {
    JobState.DONE: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "dim",
    JobState.QUEUED: "cyan",
    PairingOutcome.WAITING: "yellow",
    CtWaitState.PREFETCHING: "magenta",
    SendState.FAILED: "red",
    SendState.DONE: "green",
}
LISTABLE_STATES: tuple[str, ...] = (*JobState, *CtWaitState)
"""Job states, and the states of CTs that wait (for an MR, or for its prefetch)."""

JobFunction = Callable[[sessionmaker[Session], int], str]
ACTIONS: dict[JobAction, tuple[str, JobFunction]] = {
    JobAction.RETRY: ("queue a failed, cancelled or done job again", jobs.retry_job),
    JobAction.CANCEL: ("cancel a job that is not finished", jobs.cancel_job),
}


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``jobs list|show|retry|cancel``."""
    p = sub.add_parser("jobs", parents=[common], help="fusion jobs")
    jsub = p.add_subparsers(dest="jobs_cmd", required=True, metavar="ACTION")
    j = jsub.add_parser("list", parents=[common], help="list jobs")
    j.add_argument("--state", help="only jobs in this state")
    j.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    j.set_defaults(func=cmd_list)
    j = jsub.add_parser("show", parents=[common], help="show one job")
    j.add_argument("job_id", type=int)
    j.set_defaults(func=cmd_show)
    for name, (text, _action) in ACTIONS.items():
        j = jsub.add_parser(name, parents=[common], help=text)
        j.add_argument("job_id", type=int)
        j.set_defaults(func=cmd_action, action=name)


def cmd_list(args: argparse.Namespace) -> int:
    """``jobs list``."""
    cfg, _ = load(args)
    return list_jobs(cfg, state=args.state, limit=args.limit)


def cmd_show(args: argparse.Namespace) -> int:
    """``jobs show ID``."""
    cfg, _ = load(args)
    return show_job(cfg, args.job_id)


def cmd_action(args: argparse.Namespace) -> int:
    """``jobs retry ID`` / ``jobs cancel ID``: run the action, print its answer."""
    cfg, _ = load(args)
    which = JobAction(args.action)
    _text, action = ACTIONS[which]
    with index_sessions(cfg) as sessions:
        try:
            message = action(sessions, args.job_id)
        except KeyError:
            audit.job_action(cfg, which, args.job_id, result="no such job", ok=False)
            print(f"no job {args.job_id}", file=sys.stderr)
            return EXIT_USAGE
        with sessions() as session:
            job = session.get(Job, args.job_id)
            patient = (job.patient_id, job.issuer_of_patient_id) if job else ("", "")
    audit.job_action(
        cfg, which, args.job_id, result=message, patient_id=patient[0], issuer=patient[1]
    )
    print(message)
    return EXIT_OK


# --------------------------------------------------------------------------- formatting
def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    s = max(0.0, (now - when).total_seconds())
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.0f}d"


def _stage_times(stages: Sequence[JobStage]) -> str:
    totals: dict[str, float] = {}
    for st in stages:
        if st.seconds is not None:
            totals[st.stage] = totals.get(st.stage, 0.0) + st.seconds
    return " ".join(f"{k[:3]} {v:.0f}s" for k, v in totals.items()) or "-"


def _styled(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _sends_summary(sends: Sequence[Send]) -> str:
    return " ".join(f"{s.destination}:{s.state}({s.acked}/{s.total})" for s in sends) or "-"


def _short(uid: str | None) -> str:
    if not uid:
        return "-"
    return uid if len(uid) <= UID_SHOWN else f"...{uid[-20:]}"


def _fmt(when: datetime | None) -> str:
    return "-" if when is None else f"{when:%Y-%m-%d %H:%M:%S}"


def _table(title: str, columns: Sequence[str], *, show_header: bool = True) -> Table:
    table = Table(title=title, show_header=show_header)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


# --------------------------------------------------------------------------- list
def list_jobs(config: NodeConfig, *, state: str | None = None, limit: int = DEFAULT_LIMIT) -> int:
    """Print the newest jobs (and CTs waiting for an MR) as a table."""
    if state is not None and state not in LISTABLE_STATES:
        print(f"unknown state {state!r}; one of: {', '.join(LISTABLE_STATES)}", file=sys.stderr)
        return EXIT_USAGE
    columns = ("id", "state", "patient", "CT series", "MR series", "age", "attempts")
    table = _table("fusion jobs", (*columns, "stage times", "sends"))
    now = utcnow()
    with index_sessions(config) as sessions, sessions() as session:
        if state not in tuple(CtWaitState):
            _add_job_rows(table, session, state, limit, now)
        if state is None or state in tuple(CtWaitState):
            _add_waiting_rows(table, session, now, state)
    console().print(table)
    return EXIT_OK


def _add_job_rows(
    table: Table, session: Session, state: str | None, limit: int, now: datetime
) -> None:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Job.state == JobState(state))
    for job in session.scalars(query).all():
        table.add_row(
            str(job.id),
            _styled(job.state),
            job.patient_id,
            _short(job.ct_series_uid),
            _short(job.mr_series_uid),
            _age(job.created_at, now),
            str(job.attempts),
            _stage_times(job.stages),
            _sends_summary(job.sends),
        )


def _add_waiting_rows(table: Table, session: Session, now: datetime, state: str | None) -> None:
    for d in pairing.waiting_cts(session):
        wait, fetch = ct_wait_state(session, d.ct_series_uid)
        if state is not None and wait != state:
            continue
        until = f"until {d.window_closes_at:%Y-%m-%d}" if d.window_closes_at else "-"
        table.add_row(
            "-",
            _styled(wait),
            d.patient_id,
            _short(d.ct_series_uid),
            "-",
            _age(d.decided_at, now),
            str(fetch.attempts) if fetch is not None else "-",
            f"prefetch {fetch.state}" if fetch is not None else "-",
            until,
        )


# --------------------------------------------------------------------------- show
def show_job(config: NodeConfig, job_id: int) -> int:
    """Print one job: pairing reason, stages, errors, sends, pairing decisions."""
    out = console()
    with index_sessions(config) as sessions, sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            print(f"no job {job_id}", file=sys.stderr)
            return EXIT_USAGE
        _print_job(out, session, job)
    return EXIT_OK


def _print_job(out: Console, session: Session, job: Job) -> None:
    out.print(_summary_table(job))
    out.print(_stages_table(job))
    out.print(_sends_table(job))
    out.print(_decisions_table(session, job))
    for table in prefetch_tables_for_ct(session, job.ct_series_uid):
        out.print(table)


def _summary_table(job: Job) -> Table:
    issuer = f" (issuer {job.issuer_of_patient_id})" if job.issuer_of_patient_id else ""
    rows = [
        ("state", _styled(job.state)),
        ("patient", f"{job.patient_id}{issuer}"),
        ("CT series", f"{job.ct_series_uid} (revision {job.ct_revision})"),
        ("MR series", f"{job.mr_series_uid} (revision {job.mr_revision})"),
        ("output revision", str(job.revision)),
        ("pairing reason", job.pairing_reason),
        ("attempts", str(job.attempts)),
        ("created", _fmt(job.created_at)),
        ("updated", _fmt(job.updated_at)),
        ("finished", _fmt(job.finished_at)),
        ("worker", job.worker_id or "-"),
        ("heartbeat", _fmt(job.heartbeat_at)),
        ("next try", _fmt(job.not_before)),
        ("output", job.output_dir or "-"),
        ("error", f"[red]{job.error}[/red]" if job.error else "-"),
    ]
    if job.cleaned_at is not None:
        rows.append(("cleaned (retention)", _fmt(job.cleaned_at)))
    table = _table(f"job {job.id}", ("key", "value"), show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    return table


def _stages_table(job: Job) -> Table:
    table = _table("stages", ("attempt", "stage", "started", "seconds", "error"))
    for st in job.stages:
        seconds = "-" if st.seconds is None else f"{st.seconds:.1f}"
        table.add_row(str(st.attempt), st.stage, _fmt(st.started_at), seconds, st.error or "")
    return table


def _sends_table(job: Job) -> Table:
    columns = ("destination", "kinds", "state", "acked", "attempts", "next try", "last error")
    table = _table("sends", columns)
    for s in job.sends:
        table.add_row(
            s.destination,
            s.kinds,
            _styled(s.state),
            f"{s.acked}/{s.total}",
            str(s.attempts),
            _fmt(s.next_attempt_at),
            s.last_error or "",
        )
    return table


def _decisions_table(session: Session, job: Job) -> Table:
    table = _table(
        "pairing decisions for this CT", ("when", "outcome", "MR series", "job", "reason")
    )
    decisions = session.scalars(
        select(PairingDecision)
        .where(PairingDecision.ct_series_uid == job.ct_series_uid)
        .order_by(PairingDecision.id)
    ).all()
    for d in decisions:
        table.add_row(
            _fmt(d.decided_at), d.outcome, _short(d.mr_series_uid), str(d.job_id or "-"), d.reason
        )
    return table
