"""Scale-out with real peers: one ``serve`` and three ``dicom-node worker`` processes, each with
its own config file and host name (as if on three machines), on one PostgreSQL database and one
storage root, sending to a real Orthanc.

Six CT-MR pairs of six patients arrive; one worker is killed with SIGKILL in the middle of a
job. Every job must be claimed exactly once (the killed one once more, by another worker, only
after its lease expired) and every derived instance acknowledged once and stored once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.models import Job, SentInstance
from dicom_node.states import JobState, SendState
from tests.peers import wait_until
from tests.peers.hosts import require_host_namespaces
from tests.peers.orthanc import Orthanc
from tests.peers.scale_out import (
    Deployment,
    deploy,
    deployment_sections,
    patient_pairs,
    send_pairs,
)
from tests.support.data import SMALL_CT, require_small_fixtures

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(420)]

PAIRS = 6
WORKERS = 3
LEASE_SECONDS = 6.0
HEARTBEAT_SECONDS = 0.5
ALL_DONE_TIMEOUT = 300.0


@pytest.fixture
def deployment_factory(tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    """Start scaled-out deployments; every process is stopped at teardown."""
    made: list[Deployment] = []

    def make(*args: object, **kwargs: object) -> Deployment:
        deployment = deploy(*args, **kwargs)  # type: ignore[arg-type]
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.stop()


def _owner_host(job: Job) -> str:
    """The host name in a job's owner id (``host/pidns:pid:tag``)."""
    assert job.worker_id is not None
    return job.worker_id.split(":")[0].split("/")[0]


def test_three_workers_on_one_postgres_share_six_pairs_and_survive_a_kill(
    tmp_path: Path,
    postgres_url: str,
    orthanc_factory: Callable[..., Orthanc],
    deployment_factory: Callable[..., Deployment],
) -> None:
    require_small_fixtures()
    require_host_namespaces()
    pacs = orthanc_factory()
    sections = deployment_sections(
        tmp_path / "shared-storage",
        postgres_url,
        pacs,
        jobs={"lease_seconds": LEASE_SECONDS, "heartbeat_seconds": HEARTBEAT_SECONDS},
    )
    node = deployment_factory(tmp_path / "machines", sections, WORKERS)
    pairs = patient_pairs(tmp_path / "incoming", PAIRS, "scale")
    node.wait_workers_started()
    send_pairs(node.serve.port, pairs)

    # kill -9 the worker of the first job that is fusing (the middle of a job)
    view = node.view

    def fusing() -> Job | None:
        return next((j for j in view.jobs() if j.state == JobState.FUSING), None)

    victim = wait_until(fusing, timeout=ALL_DONE_TIMEOUT, interval=0.2, what="a job fusing")
    victim_host = _owner_host(victim)
    killed = node.workers[victim_host]
    assert victim.worker_id is not None and f":{killed.proc.pid}:" in victim.worker_id
    killed.proc.kill()
    assert killed.proc.wait(10) < 0
    with view.sessions() as s:  # the dead worker's last heartbeat: its lease runs from there
        dead = s.get(Job, victim.id)
    assert dead is not None and dead.heartbeat_at is not None
    last_beat = dead.heartbeat_at

    done = view.wait_jobs(PAIRS, timeout=ALL_DONE_TIMEOUT)
    assert len(done) == PAIRS, node.logs()
    assert len({(j.ct_series_uid, j.mr_series_uid) for j in done}) == PAIRS
    assert len({j.patient_id for j in done}) == PAIRS

    # every job claimed exactly once; the killed one once more, after its lease ran out
    claims = node.claims()
    assert claims == {j.id: 2 if j.id == victim.id else 1 for j in done}, node.logs()
    assert {j.id: j.attempts for j in done} == claims
    redone = next(j for j in done if j.id == victim.id)
    first_try = [st for st in redone.stages if st.attempt == 1]
    taken_back_at = max(st.finished_at for st in first_try if st.finished_at is not None)
    assert any(st.error and "stopped answering" in st.error for st in first_try)
    assert taken_back_at - last_beat >= timedelta(seconds=LEASE_SECONDS)  # not before expiry
    claimers = [
        host
        for host, worker in node.workers.items()
        if f"job {victim.id} claimed by worker {host}/" in worker.log()
    ]
    assert len(claimers) == 2 and victim_host in claimers, claimers

    # no worker of serve's: the serve process only receives, pairs and retries sends
    assert "no embedded worker" in node.serve.log()
    assert "claimed by worker" not in node.serve.log()

    # delivered once: every derived instance acknowledged once per job (a send attempt that
    # failed, e.g. Orthanc slow under load, re-sends only what was not acknowledged)
    n_ct = len(list(SMALL_CT.glob("*.dcm")))
    per_job = 2 * n_ct + 1  # fused + registered MR (one per CT slice) + one REG
    with view.sessions() as s:
        acks = Counter(s.scalars(select(SentInstance.sop_instance_uid)).all())
    assert len(acks) == PAIRS * per_job and set(acks.values()) == {1}
    for job in done:
        (send,) = job.sends
        assert (send.state, send.total, send.acked) == (SendState.DONE, per_job, per_job)
    assert pacs.statistics()["CountInstances"] == PAIRS * per_job
    assert len(pacs.series()) == PAIRS * 3
