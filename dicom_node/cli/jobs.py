"""``dicom-node jobs``: list, show, retry and cancel fusion jobs (rich tables on stdout).

These print to the admin's terminal, which may show the Patient ID; nothing here logs it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import models
from dicom_node.config import NodeConfig
from dicom_node.errors import EXIT_OK, EXIT_USAGE
from dicom_node.models import Job, JobStage, PairingDecision, Send
from dicom_node.orchestration import jobs, pairing

_STATE_STYLE = {
    jobs.DONE: "green",
    jobs.FAILED: "red",
    jobs.CANCELLED: "dim",
    jobs.QUEUED: "cyan",
    pairing.WAITING: "yellow",
}


def _console() -> Console:
    out = sys.stdout
    return Console(file=out, width=None if out.isatty() else 200, highlight=False)


def _sessions(config: NodeConfig) -> tuple[Any, sessionmaker[Session]]:
    from dicom_node.db import make_engine, migrate, session_factory

    engine = make_engine(config.database_url)
    migrate(engine)
    return engine, session_factory(engine)


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


def _stage_times(stages: list[JobStage]) -> str:
    totals: dict[str, float] = {}
    for st in stages:
        if st.seconds is not None:
            totals[st.stage] = totals.get(st.stage, 0.0) + st.seconds
    return " ".join(f"{k[:3]} {v:.0f}s" for k, v in totals.items()) or "-"


def _styled(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _sends_summary(sends: list[Send]) -> str:
    return " ".join(f"{s.destination}:{s.state}({s.acked}/{s.total})" for s in sends) or "-"


def list_jobs(config: NodeConfig, *, state: str | None = None, limit: int = 50) -> int:
    """Print the newest jobs (and CTs waiting for an MR) as a table."""
    if state is not None and state not in (*jobs.STATES, pairing.WAITING):
        print(
            f"unknown state {state!r}; one of: {', '.join(jobs.STATES)}, waiting", file=sys.stderr
        )
        return EXIT_USAGE
    engine, sessions = _sessions(config)
    now = models.utcnow()
    table = Table(title="fusion jobs")
    for col in (
        "id",
        "state",
        "patient",
        "CT series",
        "MR series",
        "age",
        "attempts",
        "stage times",
        "sends",
    ):
        table.add_column(col, overflow="fold")
    try:
        with sessions() as session:
            if state != pairing.WAITING:
                query = select(Job).order_by(Job.id.desc()).limit(limit)
                if state is not None:
                    query = query.where(Job.state == state)
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
            if state in (None, pairing.WAITING):
                for d in pairing.waiting_cts(session):
                    table.add_row(
                        "-",
                        _styled(pairing.WAITING),
                        d.patient_id,
                        _short(d.ct_series_uid),
                        "-",
                        _age(d.decided_at, now),
                        "-",
                        "-",
                        f"until {d.window_closes_at:%Y-%m-%d}" if d.window_closes_at else "-",
                    )
    finally:
        engine.dispose()
    _console().print(table)
    return EXIT_OK


def _short(uid: str | None) -> str:
    if not uid:
        return "-"
    return uid if len(uid) <= 24 else f"...{uid[-20:]}"


def _fmt(when: datetime | None) -> str:
    return "-" if when is None else f"{when:%Y-%m-%d %H:%M:%S}"


def show_job(config: NodeConfig, job_id: int) -> int:
    """Print one job: pairing reason, stages, errors, sends."""
    engine, sessions = _sessions(config)
    console = _console()
    try:
        with sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                print(f"no job {job_id}", file=sys.stderr)
                return EXIT_USAGE
            head = Table(title=f"job {job.id}", show_header=False)
            head.add_column("key")
            head.add_column("value", overflow="fold")
            rows = [
                ("state", _styled(job.state)),
                (
                    "patient",
                    f"{job.patient_id}"
                    + (f" (issuer {job.issuer_of_patient_id})" if job.issuer_of_patient_id else ""),
                ),
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
            for k, v in rows:
                head.add_row(k, v)
            console.print(head)

            stages = Table(title="stages")
            for col in ("attempt", "stage", "started", "seconds", "error"):
                stages.add_column(col, overflow="fold")
            for st in job.stages:
                stages.add_row(
                    str(st.attempt),
                    st.stage,
                    _fmt(st.started_at),
                    "-" if st.seconds is None else f"{st.seconds:.1f}",
                    st.error or "",
                )
            console.print(stages)

            sends = Table(title="sends")
            for col in (
                "destination",
                "kinds",
                "state",
                "acked",
                "attempts",
                "next try",
                "last error",
            ):
                sends.add_column(col, overflow="fold")
            for s in job.sends:
                sends.add_row(
                    s.destination,
                    s.kinds,
                    _styled(s.state),
                    f"{s.acked}/{s.total}",
                    str(s.attempts),
                    _fmt(s.next_attempt_at),
                    s.last_error or "",
                )
            console.print(sends)

            decisions = Table(title="pairing decisions for this CT")
            for col in ("when", "outcome", "MR series", "job", "reason"):
                decisions.add_column(col, overflow="fold")
            for d in session.scalars(
                select(PairingDecision)
                .where(PairingDecision.ct_series_uid == job.ct_series_uid)
                .order_by(PairingDecision.id)
            ).all():
                decisions.add_row(
                    _fmt(d.decided_at),
                    d.outcome,
                    _short(d.mr_series_uid),
                    str(d.job_id or "-"),
                    d.reason,
                )
            console.print(decisions)
    finally:
        engine.dispose()
    return EXIT_OK


def _job_action(config: NodeConfig, job_id: int, action: Callable[[Any, int], str]) -> int:
    """Run ``action(sessions, job_id)`` and print its message; unknown job -> usage error."""
    engine, sessions = _sessions(config)
    try:
        message = action(sessions, job_id)
    except KeyError:
        print(f"no job {job_id}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        engine.dispose()
    print(message)
    return EXIT_OK


def retry_job(config: NodeConfig, job_id: int) -> int:
    """Queue a failed/cancelled/done job again (derived files and acks are kept)."""
    return _job_action(config, job_id, jobs.retry_job)


def cancel_job(config: NodeConfig, job_id: int) -> int:
    """Cancel a job that is not finished."""
    return _job_action(config, job_id, jobs.cancel_job)
