"""Taking work back from dead workers: stale job leases and sends stuck in ``sending``.

Safe to run from any process at any time (the scheduler and every idle worker do): each
take-back is a conditional UPDATE that matches only the exact row state that was read.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigError
from dicom_node.models import Job, Send, utcnow
from dicom_node.orchestration.jobs.lifecycle import close_open_stages, rowcount
from dicom_node.orchestration.jobs.settings import Settings
from dicom_node.states import ACTIVE_JOB_STATES, JobState, SendState

log = logging.getLogger(__name__)


PID_NAMESPACE = Path("/proc/self/ns/pid")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
BOOT_ID_CHARS = 12
"""Hex digits of the kernel's boot id kept in an owner id (random per boot of a machine)."""
MAX_HOST_NAME = 64
"""Longest host name kept in an owner id (Linux HOST_NAME_MAX; ids fit ``worker_id``)."""


def host_identity() -> str:
    """Where this process's pids mean something: host name, kernel boot and PID namespace.

    A pid names a process only within one kernel's PID namespace. Host names are not enough:
    cloned machines share one, and so can containers (``network_mode: host``, a fixed
    ``hostname:``) whose pids are unrelated. The kernel's random boot id tells machines (and
    boots) apart, the namespace inode tells containers of one kernel apart, so
    :func:`local_owner_dead` never declares a live worker of another machine or container dead.
    """
    name = socket.gethostname()[:MAX_HOST_NAME]
    try:
        boot = BOOT_ID.read_text().strip().replace("-", "")[:BOOT_ID_CHARS]
        return f"{name}/{boot}.{PID_NAMESPACE.stat().st_ino}"
    except OSError:  # no procfs (not Linux): the host name alone
        return name


def owner_id(tag: str) -> str:
    """The id of a job or send owner of this process: ``host_identity:pid:tag``."""
    return f"{host_identity()}:{os.getpid()}:{tag}"


MAX_CLOCK_SKEW_SHARE = 0.25
"""Largest clock difference to the database server, as a share of ``jobs.lease_seconds``."""
CLOCK_SKEW_WARNING_S = 1.0


def check_clock(skew_seconds: float | None, lease_seconds: float) -> None:
    """Refuse to judge leases with a clock far off the database server's.

    Heartbeats are written with each machine's clock and compared with another's: a clock off
    by a good part of the lease would make live workers look dead (their job done twice) or
    keep dead ones alive. Raises :class:`ConfigError` beyond a quarter of the lease, warns from
    a second on; ``skew_seconds`` None (SQLite, one machine) is always fine.
    """
    if skew_seconds is None:
        return
    if abs(skew_seconds) > MAX_CLOCK_SKEW_SHARE * lease_seconds:
        raise ConfigError(
            f"this machine's clock is {skew_seconds:+.1f} s off the database server's, too far "
            f"for jobs.lease_seconds = {lease_seconds:g}: leases would be misjudged. "
            "Synchronise the clocks (NTP, e.g. chrony) on every machine"
        )
    if abs(skew_seconds) > CLOCK_SKEW_WARNING_S:
        log.warning(
            "this machine's clock is %+.1f s off the database server's; synchronise the "
            "clocks (NTP) before the difference reaches %.0f s",
            skew_seconds,
            MAX_CLOCK_SKEW_SHARE * lease_seconds,
        )


def local_owner_dead(worker_id: str | None, host: str) -> bool:
    """True when ``worker_id`` (host:pid:tag) names a process of ``host`` (this machine's
    :func:`host_identity`) that is gone."""
    parts = (worker_id or "").split(":")
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but not ours (EPERM): alive
        return False
    return False


def recover_stale(
    sessions: sessionmaker[Session], cfg: Settings, *, local_host: str | None = None
) -> list[int]:
    """Requeue (or fail, after ``max_attempts``) jobs whose worker's heartbeat is stale.

    With ``local_host`` (this machine's :func:`host_identity`), jobs held by a worker process of
    this host that no longer exists are taken back at once, without waiting for the lease to
    expire (a restarted node resumes its interrupted job immediately). Also hands send rows stuck
    in ``sending`` by a dead process back to the retry queue. Returns the recovered job ids.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=cfg.lease_seconds)
    with sessions() as session:
        recovered = [
            job.id
            for job in _stale_jobs(session, cutoff, local_host)
            if _take_back(session, job, cfg, now)
        ]
        _requeue_stuck_sends(session, cutoff, now, local_host)
        session.commit()
    return recovered


def _stale_jobs(session: Session, cutoff: datetime, local_host: str | None) -> list[Job]:
    """Active jobs whose lease expired, plus those held by a dead process of this host."""
    stale = list(
        session.scalars(
            select(Job).where(
                Job.state.in_(ACTIVE_JOB_STATES),
                Job.worker_id.is_not(None),
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
            )
        ).all()
    )
    if local_host:
        held = session.scalars(
            select(Job).where(
                Job.state.in_(ACTIVE_JOB_STATES),
                Job.worker_id.like(f"{local_host}:%"),
                Job.heartbeat_at >= cutoff,
            )
        ).all()
        stale.extend(j for j in held if local_owner_dead(j.worker_id, local_host))
    return stale


def _take_back(session: Session, job: Job, cfg: Settings, now: datetime) -> bool:
    """Requeue or fail one stale job, unless its row changed since it was read."""
    msg = f"worker {job.worker_id} stopped answering during {job.state} (attempt {job.attempts})"
    values: dict[str, Any] = {"worker_id": None, "heartbeat_at": None, "updated_at": now}
    values["error"] = msg
    if job.attempts >= cfg.max_attempts:
        values.update(state=JobState.FAILED, finished_at=now)
    else:
        values.update(state=JobState.QUEUED, not_before=None)
    unchanged_heartbeat = (
        Job.heartbeat_at.is_(None)
        if job.heartbeat_at is None
        else Job.heartbeat_at == job.heartbeat_at
    )
    result = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.worker_id == job.worker_id,
            Job.state == job.state,
            unchanged_heartbeat,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return False
    close_open_stages(session, job.id, now, error=msg)
    log.warning("job %d: %s -> %s", job.id, msg, values["state"])
    return True


def _requeue_stuck_sends(
    session: Session, cutoff: datetime, now: datetime, local_host: str | None
) -> None:
    """Sends left in ``sending`` by a dead process go back to the retry queue, due now."""
    stuck = Send.state == SendState.SENDING
    dead_sends: list[int] = []
    if local_host:
        dead_sends = [
            s.id
            for s in session.scalars(
                select(Send).where(stuck, Send.worker_id.like(f"{local_host}:%"))
            ).all()
            if local_owner_dead(s.worker_id, local_host)
        ]
    session.execute(
        update(Send)
        .where(
            stuck,
            or_(Send.heartbeat_at.is_(None), Send.heartbeat_at < cutoff, Send.id.in_(dead_sends)),
        )
        .values(state=SendState.RETRY, worker_id=None, heartbeat_at=None, next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
