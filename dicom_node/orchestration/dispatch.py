"""Dispatch of a job's derived objects: what goes where, one attempt per destination.

The worker writes a job's derived files and their manifest before anything is sent
(:mod:`dicom_node.storage.derived`), so a retry never recomputes. Each destination of
``routing.send_to`` has a send row with its own attempts and exponential backoff
(:mod:`dicom_node.orchestration.jobs.sends`); every instance a destination acknowledges is
recorded and never sent to it again; a send with any instance not acknowledged is a failed
attempt. A destination receives only the kinds in ``destinations.<name>.send``, over DICOM TLS
when it has a ``tls`` section; every send is recorded in the audit trail (instances-sent, one
record per study).

Send rows are claimed like jobs, so the scheduler and idle workers can all run
:func:`retry_due_sends`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.config import Destination, NodeConfig
from dicom_node.errors import ConfigError, NetworkError, SendError
from dicom_node.net import scu
from dicom_node.orchestration.jobs import Settings, finish_if_sent
from dicom_node.orchestration.jobs import sends as send_rows
from dicom_node.states import ALL_DERIVED_KINDS, SendState
from dicom_node.storage.derived import DerivedFile, job_dir, read_manifest

log = logging.getLogger(__name__)


@contextmanager
def heartbeat_thread(beat: Callable[[], bool], interval: float) -> Iterator[threading.Event]:
    """Call ``beat()`` every ``interval`` s in a daemon thread; the yielded event is set when
    a beat returns False (the lease was lost)."""
    stop = threading.Event()
    lost = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            try:
                if not beat():
                    lost.set()
            except Exception:  # a failed beat (database busy) is retried at the next tick
                log.exception("heartbeat failed")

    thread = threading.Thread(target=run, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join(timeout=5)


def send_once(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    send_id: int,
    owner: str,
    files: Sequence[DerivedFile],
    *,
    due_only: bool = False,
) -> SendState | None:
    """One attempt of one destination: send what it has not acknowledged, record the outcome.

    Returns the send's new state, or None when it could not be claimed (someone else has it,
    or it is not due).
    """
    if not send_rows.claim_send(sessions, send_id, owner, due_only=due_only):
        return None
    cfg = Settings.from_config(config)
    name, kinds, attempt = send_rows.send_target(sessions, send_id)
    with sessions() as session:
        done = send_rows.acked_uids(session, send_id)
    todo = [f for f in files if f.kind in kinds and f.sop_instance_uid not in done]
    dest = config.destinations.get(name)
    if dest is None:
        gone = f"destination {name!r} is no longer configured"
        return send_rows.finish_send_attempt(
            sessions, send_id, owner, attempt, gone, retryable=False, cfg=cfg
        )

    def beat() -> bool:
        return send_rows.send_heartbeat(sessions, send_id, owner)

    with heartbeat_thread(beat, cfg.heartbeat_seconds):
        error = _send_by_kind(sessions, config, dest, send_id, todo)
    return send_rows.finish_send_attempt(
        sessions, send_id, owner, attempt, error, retryable=True, cfg=cfg
    )


def _send_by_kind(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    dest: Destination,
    send_id: int,
    todo: Sequence[DerivedFile],
) -> str | None:
    """Send ``todo`` one series (kind) at a time, recording acknowledgements as they come.

    Returns the first error, or None when everything was acknowledged.
    """
    for kind in ALL_DERIVED_KINDS:
        batch = [f for f in todo if f.kind == kind]
        if not batch:
            continue
        try:
            result = scu.send_files(
                dest,
                [f.path for f in batch],
                options=scu.SendOptions(
                    calling_aet=config.node.ae_title,
                    retries=0,
                    tls=dest.tls,
                    audit=audit.trail(config),
                ),
            )
            send_rows.record_acks(sessions, send_id, result.sop_instance_uids)
        except SendError as exc:
            ok = [
                f.sop_instance_uid
                for f in batch
                if f.sop_instance_uid not in exc.failed and str(f.path) not in exc.failed
            ]
            if exc.sent and ok:
                send_rows.record_acks(sessions, send_id, ok)
            return f"{kind}: {exc}"
        except (NetworkError, ConfigError) as exc:  # ConfigError: unusable TLS files
            return f"{kind}: {exc}"
        except Exception as exc:  # a broken send must not kill the caller's loop
            log.exception("send %d to %s crashed", send_id, dest.ae_title)
            return f"{kind}: {type(exc).__name__}: {exc}"
    return None


def send_job(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    job_id: int,
    owner: str,
    files: Sequence[DerivedFile],
) -> dict[str, SendState]:
    """First send round of a job (from the worker): every destination once. Name -> state."""
    counts = Counter(f.kind for f in files)
    out: dict[str, SendState] = {}
    for send_id in send_rows.prepare_sends(sessions, config, job_id, dict(counts)):
        name = send_rows.send_target(sessions, send_id)[0]
        state = send_once(sessions, config, send_id, owner, files)
        if state is not None:
            out[name] = state
    return out


def retry_due_sends(sessions: sessionmaker[Session], config: NodeConfig, owner: str) -> int:
    """Send every due retry of jobs that wait in ``sending``; close jobs whose sends ended.

    Returns the number of send attempts made. Safe to call from several processes.
    """
    due, waiting_jobs = send_rows.due_sends(sessions)
    made = 0
    for send_id, job_id in due:
        files = read_manifest(job_dir(config, job_id))
        if files is None:
            send_rows.fail_send(sessions, send_id, "derived files are missing (retention?)")
            continue
        if send_once(sessions, config, send_id, owner, files, due_only=True) is not None:
            made += 1
    for job_id in set(waiting_jobs) | {job for _, job in due}:
        finish_if_sent(sessions, job_id)
    return made
