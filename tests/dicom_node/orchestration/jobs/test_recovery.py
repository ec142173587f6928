"""Recovery: stale leases, dead local workers and sends stuck in ``sending``."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from dicom_node import models
from dicom_node.errors import ConfigError
from dicom_node.models import Job, Send
from dicom_node.orchestration import jobs
from dicom_node.orchestration.jobs import recovery
from dicom_node.states import JobState, SendState
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs


def test_job_of_dead_local_worker_recovered_at_once(indexed_node: IndexedNode) -> None:
    """A job held by a process of this host that no longer exists is requeued without
    waiting for its lease to expire; a live holder keeps its job."""
    node = indexed_node
    cfg = jobs.Settings.from_config(node.config)
    host = socket.gethostname()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_id = f"{host}:{int(gone.stdout)}:dead"
    live_id = f"{host}:{os.getpid()}:live"
    a, b = make_jobs(node, 2)
    assert jobs.claim_next(node.sessions, dead_id) == a
    assert jobs.claim_next(node.sessions, live_id) == b
    assert jobs.recover_stale(node.sessions, cfg) == []  # leases still fresh
    assert jobs.recover_stale(node.sessions, cfg, local_host=host) == [a]
    with node.sessions() as s:
        states = {j.id: j.state for j in s.scalars(select(Job)).all()}
    assert states == {a: JobState.QUEUED, b: JobState.REGISTERING}


def test_send_stuck_by_a_dead_process_is_retried(indexed_node: IndexedNode) -> None:
    node = indexed_node
    cfg = jobs.Settings.from_config(node.config)
    (job_id,) = make_jobs(node, 1)
    stale = models.utcnow() - timedelta(hours=1)
    with node.sessions() as s:
        s.add(
            Send(
                job_id=job_id,
                destination="PACS",
                kinds="fused",
                state=SendState.SENDING,
                worker_id="elsewhere:1:x",
                heartbeat_at=stale,
                updated_at=stale,
            )
        )
        s.commit()
    jobs.recover_stale(node.sessions, cfg)
    with node.sessions() as s:
        send = s.scalars(select(Send)).one()
        assert (send.state, send.worker_id) == (SendState.RETRY, None)
        assert send.next_attempt_at is not None


def test_stale_job_on_its_last_attempt_fails(indexed_node: IndexedNode) -> None:
    node = indexed_node
    cfg = jobs.Settings.from_config(node.config)
    (job_id,) = make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "gone:1:x") == job_id
    stale = models.utcnow() - timedelta(hours=1)
    with node.sessions() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(attempts=cfg.max_attempts, heartbeat_at=stale)
        )
        s.commit()
    assert jobs.recover_stale(node.sessions, cfg) == [job_id]
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.FAILED
        assert "stopped answering" in (job.error or "")


def test_same_host_name_on_another_machine_or_container_is_never_declared_dead(
    indexed_node: IndexedNode,
) -> None:
    """Cloned machines and containers (network_mode: host) can share a host name while their
    pids are unrelated: a worker of another kernel boot or PID namespace is left to its lease,
    even when its pid does not exist here."""
    node = indexed_node
    cfg = jobs.Settings.from_config(node.config)
    here = jobs.host_identity()
    assert here.startswith(socket.gethostname()[: recovery.MAX_HOST_NAME])
    assert here != socket.gethostname()  # kernel boot and PID namespace are part of it
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host, boot_and_namespace = here.split("/")
    boot, namespace = boot_and_namespace.split(".")
    pid = int(gone.stdout)
    other_container = f"{host}/{boot}.1:{pid}:w"
    other_machine = f"{host}/{'0' * len(boot)}.{namespace}:{pid}:w"
    same_namespace = f"{here}:{pid}:w"
    a, b, c = make_jobs(node, 3)
    assert jobs.claim_next(node.sessions, other_container) == a
    assert jobs.claim_next(node.sessions, other_machine) == b
    assert jobs.claim_next(node.sessions, same_namespace) == c
    assert jobs.recover_stale(node.sessions, cfg, local_host=here) == [c]
    assert jobs.owner_id("x") == f"{here}:{os.getpid()}:x"


def test_a_clock_far_off_the_database_server_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    jobs.check_clock(None, 60.0)  # SQLite: one machine, one clock
    jobs.check_clock(0.3, 60.0)
    with caplog.at_level(logging.WARNING, logger="dicom_node.orchestration.jobs.recovery"):
        jobs.check_clock(-5.0, 60.0)
    assert "off the database server's" in caplog.text
    with pytest.raises(ConfigError, match="NTP"):
        jobs.check_clock(16.0, 60.0)
