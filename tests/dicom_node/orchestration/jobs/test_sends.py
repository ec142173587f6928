"""Send rows: one per routed destination, exclusive claims, acknowledgements, retries."""

from __future__ import annotations

import threading

from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.models import Send
from dicom_node.orchestration import jobs
from dicom_node.orchestration.jobs import sends
from dicom_node.states import DerivedKind, SendState
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs

COUNTS = {DerivedKind.FUSED: 3, DerivedKind.REGISTERED_MR: 3, DerivedKind.REG: 1}
LOCK_WAIT_LIMIT_S = 10.0
"""How long a claim may take while another transaction holds the row lock (it must not wait)."""


def _routed(node: IndexedNode, **jobs_section: object) -> NodeConfig:
    data = node.config.model_dump(mode="json")
    data["destinations"] = {
        "PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": 105, "send": ["reg"]},
        "NONE": {"ae_title": "NONE", "host": "127.0.0.1", "port": 106, "send": []},
    }
    data["routing"] = {"send_to": ["PACS", "TPS", "NONE"]}
    data["jobs"] = {**data["jobs"], **jobs_section}
    return NodeConfig.model_validate(data)


def test_prepare_sends_is_idempotent_and_counts_routed_kinds(indexed_node: IndexedNode) -> None:
    node = indexed_node
    config = _routed(node)
    (job_id,) = make_jobs(node, 1)
    open_ids = sends.prepare_sends(node.sessions, config, job_id, COUNTS)
    assert sends.prepare_sends(node.sessions, config, job_id, COUNTS) == open_ids
    with node.sessions() as s:
        rows = {x.destination: (x.total, x.state) for x in s.scalars(select(Send))}
    assert rows == {
        "PACS": (7, SendState.PENDING),
        "TPS": (1, SendState.PENDING),
        "NONE": (0, SendState.DONE),  # receives none of the kinds: nothing to do
    }
    assert len(open_ids) == 2


def test_a_claimed_send_belongs_to_one_owner(indexed_node: IndexedNode) -> None:
    node = indexed_node
    (job_id,) = make_jobs(node, 1)
    send_id = sends.prepare_sends(node.sessions, _routed(node), job_id, COUNTS)[0]
    assert sends.claim_send(node.sessions, send_id, "a", due_only=False)
    assert not sends.claim_send(node.sessions, send_id, "b", due_only=False)
    assert sends.send_heartbeat(node.sessions, send_id, "a")
    assert not sends.send_heartbeat(node.sessions, send_id, "b")


def test_acks_are_recorded_once(indexed_node: IndexedNode) -> None:
    node = indexed_node
    (job_id,) = make_jobs(node, 1)
    send_id = sends.prepare_sends(node.sessions, _routed(node), job_id, COUNTS)[0]
    sends.record_acks(node.sessions, send_id, ["2.25.1", "2.25.2", "2.25.1"])
    sends.record_acks(node.sessions, send_id, ["2.25.2"])
    with node.sessions() as s:
        assert sends.acked_uids(s, send_id) == {"2.25.1", "2.25.2"}


def test_failed_attempts_retry_with_backoff_then_fail(indexed_node: IndexedNode) -> None:
    node = indexed_node
    config = _routed(node, send_max_attempts=2, retry_backoff_seconds=30)
    cfg = jobs.Settings.from_config(config)
    (job_id,) = make_jobs(node, 1)
    send_id = sends.prepare_sends(node.sessions, config, job_id, COUNTS)[0]
    assert sends.claim_send(node.sessions, send_id, "w", due_only=True)
    state = sends.finish_send_attempt(
        node.sessions, send_id, "w", 1, "peer down", retryable=True, cfg=cfg
    )
    assert state is SendState.RETRY
    assert not sends.claim_send(node.sessions, send_id, "w", due_only=True)  # not due yet
    assert sends.claim_send(node.sessions, send_id, "w", due_only=False)
    state = sends.finish_send_attempt(
        node.sessions, send_id, "w", 2, "peer down", retryable=True, cfg=cfg
    )
    assert state is SendState.FAILED


def test_non_retryable_error_fails_at_once(indexed_node: IndexedNode) -> None:
    node = indexed_node
    config = _routed(node)
    cfg = jobs.Settings.from_config(config)
    (job_id,) = make_jobs(node, 1)
    send_id = sends.prepare_sends(node.sessions, config, job_id, COUNTS)[0]
    assert sends.claim_send(node.sessions, send_id, "w", due_only=False)
    gone = "destination gone"
    state = sends.finish_send_attempt(
        node.sessions, send_id, "w", 1, gone, retryable=False, cfg=cfg
    )
    assert state is SendState.FAILED


def test_postgres_send_claim_does_not_wait_for_a_locked_row(postgres_node: IndexedNode) -> None:
    """A send row locked by another process's claim is reported taken at once, not waited for."""
    node = postgres_node
    (job_id,) = make_jobs(node, 1)
    send_id = sends.prepare_sends(node.sessions, _routed(node), job_id, COUNTS)[0]
    got: list[bool] = []
    with node.engine.connect() as other:
        other.execute(select(Send.id).where(Send.id == send_id).with_for_update())
        thread = threading.Thread(
            target=lambda: got.append(sends.claim_send(node.sessions, send_id, "b", due_only=False))
        )
        thread.start()
        thread.join(LOCK_WAIT_LIMIT_S)
        assert not thread.is_alive(), "claim_send waited for a locked row"
        assert got == [False]
        other.rollback()
    assert sends.claim_send(node.sessions, send_id, "c", due_only=False)
