"""Prefetch against a real PACS (Orthanc) and the node's real SCP, driven tick by tick."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select, update

from dicom_node import audit
from dicom_node.errors import UsageError
from dicom_node.models import PairingDecision, Prefetch, Retrieval, Series, utcnow
from dicom_node.orchestration import pairing, prefetch
from dicom_node.states import (
    PairingOutcome,
    PrefetchEventKind,
    PrefetchState,
    PrefetchTrigger,
    RetrievalState,
)
from tests.peers import wait_until
from tests.peers.node import FAST_ORCHESTRATION
from tests.peers.orthanc import Orthanc
from tests.support.data import SMALL_CT, SMALL_MR, encode, require_small_fixtures
from tests.support.jobs import all_jobs
from tests.support.prefetch import (
    PrefetchSetup,
    events_text,
    first_uid,
    listening,
    own_derived_copy,
    prefetch_setup,
    prefetches,
    rewritten,
)
from tests.support.time import later

pytestmark = pytest.mark.peers

OWNER = "test:prefetch"
CT_SERIES = first_uid(SMALL_CT, "SeriesInstanceUID") if any(SMALL_CT.glob("*.dcm")) else ""
MR_SERIES = first_uid(SMALL_MR, "SeriesInstanceUID") if any(SMALL_MR.glob("*.dcm")) else ""
N_MR = len(list(SMALL_MR.glob("*.dcm")))


@pytest.fixture
def make_setup(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc]
) -> Iterator[Callable[..., PrefetchSetup]]:
    """``make(**prefetch)``: a node index with prefetch configured and a PACS that knows it."""
    require_small_fixtures()
    made: list[PrefetchSetup] = []

    def make(**settings: Any) -> PrefetchSetup:
        setup = prefetch_setup(tmp_path / f"node{len(made)}", orthanc_factory, **settings)
        made.append(setup)
        return setup

    yield make
    for setup in made:
        setup.node.close()


def _waiting_ct(setup: PrefetchSetup) -> None:
    """Only the CT reaches the node: it completes and waits for an MR."""
    setup.node.ingest(SMALL_CT, aet="CTSIM")
    result = pairing.scan(setup.node.sessions, setup.node.config, now=later())
    assert result.waiting == [CT_SERIES]


def _run(setup: PrefetchSetup) -> list[int]:
    node = setup.node
    return prefetch.run_due(node.sessions, node.config, node.store, OWNER)


def _series_in_index(setup: PrefetchSetup) -> dict[str, int]:
    with setup.node.sessions() as s:
        return {
            row.series_instance_uid: row.number_of_instances
            for row in s.scalars(select(Series)).all()
        }


def test_waiting_ct_gets_its_mr_by_move_and_pairs(
    make_setup: Callable[..., PrefetchSetup], tmp_path: Path
) -> None:
    """The PACS holds the MR, the node's own derived series (in the CT's study), another
    issuer's MR and a CT in the MR's study: only the MR is retrieved, then pairing proceeds."""
    setup = make_setup()
    ct_study = first_uid(SMALL_CT, "StudyInstanceUID")
    mr_study = first_uid(SMALL_MR, "StudyInstanceUID")
    own = own_derived_copy(SMALL_MR, tmp_path / "own", ct_study)
    other_issuer = rewritten(SMALL_MR, tmp_path / "issuer", "issuer", IssuerOfPatientID="OTHER")
    prior_ct = rewritten(SMALL_CT, tmp_path / "prior", "prior", StudyInstanceUID=mr_study)
    for folder in (SMALL_MR, own, other_issuer, prior_ct):
        setup.pacs.upload_folder(folder)
    _waiting_ct(setup)

    node = setup.node
    (requested,) = prefetch.request_for_waiting(node.sessions, node.config)
    assert prefetch.request_for_waiting(node.sessions, node.config) == []  # once per revision
    with listening(node):
        assert _run(setup) == [requested]
    (row,) = prefetches(node)
    assert row.state == PrefetchState.RETRIEVED and row.attempts == 1, row.reason
    kinds = [e.kind for e in row.events]
    assert kinds[0] == PrefetchEventKind.QUERY and kinds[-1] == PrefetchEventKind.OUTCOME
    assert PrefetchEventKind.CHOICE in kinds and PrefetchEventKind.RETRIEVE in kinds
    text = "\n".join(events_text(node))
    assert "IssuerOfPatientID differs" in text  # another issuer's patient: not even a candidate
    assert "the node's own derived series" in text
    (retrieval,) = row.retrievals
    assert (retrieval.series_uid, retrieval.state) == (MR_SERIES, RetrievalState.COMPLETE)
    assert retrieval.expected == retrieval.completed == N_MR
    stored = _series_in_index(setup)
    assert stored == {CT_SERIES: len(list(SMALL_CT.glob("*.dcm"))), MR_SERIES: N_MR}

    pairing.scan(node.sessions, node.config, now=later())  # the MR completes: pairing proceeds
    (job,) = all_jobs(node)
    assert (job.ct_series_uid, job.mr_series_uid) == (CT_SERIES, MR_SERIES)


def test_no_mr_in_the_pacs_is_a_visible_end(make_setup: Callable[..., PrefetchSetup]) -> None:
    setup = make_setup()
    setup.pacs.upload_folder(SMALL_CT)  # the PACS has the patient, but no MR
    _waiting_ct(setup)
    node = setup.node
    prefetch.request_for_waiting(node.sessions, node.config)
    assert len(_run(setup)) == 1
    (row,) = prefetches(node)
    assert row.state == PrefetchState.NOT_FOUND and row.finished_at is not None
    assert "no MR series of this patient in the PACS" in row.reason
    # not a loop: nothing is due, nothing new is requested, the CT still waits visibly
    assert _run(setup) == []
    pairing.scan(node.sessions, node.config, now=later() + timedelta(seconds=5))
    assert prefetch.request_for_waiting(node.sessions, node.config) == []
    assert [d.ct_series_uid for d in _waiting(node)] == [CT_SERIES]


def _waiting(node: object) -> list[PairingDecision]:
    with node.sessions() as s:  # type: ignore[attr-defined]
        return pairing.waiting_cts(s)


def test_pacs_down_is_retried_with_backoff(make_setup: Callable[..., PrefetchSetup]) -> None:
    setup = make_setup(max_attempts=20)
    setup.pacs.upload_folder(SMALL_MR)
    setup.pacs.stop()
    _waiting_ct(setup)
    node = setup.node
    prefetch.request_for_waiting(node.sessions, node.config)
    assert len(_run(setup)) == 1
    (row,) = prefetches(node)
    assert row.state == PrefetchState.RETRY and row.attempts == 1
    assert "cannot connect" in row.reason and row.not_before is not None
    assert row.not_before > utcnow()  # backoff: not due at once
    assert _run(setup) == []

    def attempted(n: int) -> bool:
        _run(setup)
        return prefetches(node)[0].attempts >= n

    wait_until(lambda: attempted(2), timeout=30, what="second attempt after the backoff")
    assert prefetches(node)[0].state == PrefetchState.RETRY
    setup.pacs.start()
    with listening(node):
        wait_until(
            lambda: _run(setup) and prefetches(node)[0].state == PrefetchState.RETRIEVED,
            timeout=30,
            what="retrieval once the PACS is back",
        )
    assert _series_in_index(setup)[MR_SERIES] == N_MR


def test_pacs_not_knowing_the_node_says_so(make_setup: Callable[..., PrefetchSetup]) -> None:
    """A PACS without the node as move destination: the attempt fails with the hint."""
    setup = make_setup()
    setup.pacs.upload_folder(SMALL_MR)
    setup.pacs.modalities = {}
    setup.pacs.extra_config["DicomAlwaysAllowFind"] = True  # it answers queries, though
    setup.pacs.restart()
    _waiting_ct(setup)
    prefetch.request_for_waiting(setup.node.sessions, setup.node.config)
    with listening(setup.node):
        _run(setup)
    (row,) = prefetches(setup.node)
    assert row.state == PrefetchState.RETRY
    assert "a move destination in the PACS?" in row.reason, row.reason
    assert row.retrievals[0].state == RetrievalState.FAILED


def test_gives_up_after_max_attempts(make_setup: Callable[..., PrefetchSetup]) -> None:
    setup = make_setup(max_attempts=1)
    setup.pacs.stop()
    _waiting_ct(setup)
    prefetch.request_for_waiting(setup.node.sessions, setup.node.config)
    _run(setup)
    (row,) = prefetches(setup.node)
    assert row.state == PrefetchState.FAILED
    assert row.reason.startswith("gave up after 1 attempt(s)")


def test_partial_retrieval_is_retried_and_never_paired(
    make_setup: Callable[..., PrefetchSetup],
) -> None:
    """One instance cannot be stored (the node holds another object under its SOPInstanceUID):
    the C-MOVE is partial, so it is retried, and pairing holds the MR (no job, ever)."""
    setup = make_setup(max_attempts=2)
    setup.pacs.upload_folder(SMALL_MR)
    _waiting_ct(setup)
    node = setup.node
    decoy = pydicom.dcmread(sorted(SMALL_MR.glob("*.dcm"))[0])
    decoy.SeriesInstanceUID = "1.2.3.4.5.6"
    decoy.SeriesDescription = "decoy"
    node.store.store_encoded(encode(decoy), calling_aet="OTHER", peer="test")
    prefetch.request_for_waiting(node.sessions, node.config)
    with listening(node):
        _run(setup)
        (row,) = prefetches(node)
        assert row.state == PrefetchState.RETRY, row.reason
        assert row.retrievals[0].state == RetrievalState.PARTIAL, events_text(node)
        # Orthanc ends such a C-MOVE with 0xC000 (no counts); the node counts what it holds
        assert f"{N_MR - 1} of {N_MR} instances stored: partial" in events_text(node)[-2]
        pairing.scan(node.sessions, node.config, now=later())  # the partial MR "completes"
        assert all_jobs(node) == []
        (waiting,) = _waiting(node)
        assert "held until retrieved complete" in waiting.reason
        wait_until(lambda: _run(setup), timeout=30, what="the retry")
    (row,) = prefetches(node)
    assert row.state == PrefetchState.FAILED and row.attempts == 2
    assert [r.state for r in row.retrievals] == [RetrievalState.PARTIAL] * 2
    pairing.scan(node.sessions, node.config, now=later() + timedelta(seconds=5))
    assert all_jobs(node) == []


def test_ranks_with_pairing_rules_up_to_max_series(
    make_setup: Callable[..., PrefetchSetup], tmp_path: Path
) -> None:
    rules = [{"series_description_regex": "(?i)t1.*post", "weight": 3}]
    pairing_rules = {**FAST_ORCHESTRATION["pairing"], "mr_rules": rules}
    setup = make_setup(method="get", max_series=2, sections={"pairing": pairing_rules})
    t1 = rewritten(SMALL_MR, tmp_path / "t1", "t1", SeriesDescription="T1 post contrast")
    tiny = rewritten(SMALL_MR, tmp_path / "tiny", "tiny", SeriesDescription="T1 post tiny")
    for extra in sorted(tiny.glob("*.dcm"))[2:]:
        extra.unlink()  # two images: not a volume
    for folder in (SMALL_MR, t1, tiny):
        setup.pacs.upload_folder(folder)
    node = setup.node
    _waiting_ct(setup)
    prefetch.request_for_waiting(node.sessions, node.config)
    _run(setup)  # C-GET: no listener needed
    (row,) = prefetches(node)
    assert row.state == PrefetchState.RETRIEVED, row.reason
    choices = [e for e in row.events if e.kind == PrefetchEventKind.CHOICE]
    t1_uid = first_uid(t1, "SeriesInstanceUID")
    assert [c.series_uid for c in choices] == [t1_uid, MR_SERIES]
    assert "weight 3" in choices[0].detail
    text = "\n".join(events_text(node))
    assert "2 images: not a volume" in text
    assert set(_series_in_index(setup)) == {CT_SERIES, MR_SERIES, t1_uid}
    pairing.scan(node.sessions, node.config, now=later())
    (job,) = all_jobs(node)
    assert job.mr_series_uid == t1_uid
    records = _audit_records(setup)
    (query,) = [r for r in records if r["event"] == "query"]
    assert query["outcome"] == 0 and query["participants"][1]["user_id"] == setup.pacs.aet
    received = [r for r in records if r["event"] == "instances-received"]
    assert received and {r["participants"][0]["user_id"] for r in received} == {setup.pacs.aet}
    patient_id = str(pydicom.dcmread(sorted(SMALL_MR.glob("*.dcm"))[0]).PatientID)
    assert patient_id not in json.dumps(records)  # hashed, never in the clear


def _audit_records(setup: PrefetchSetup) -> list[dict[str, Any]]:
    config = setup.node.config
    log_file, _ = config.audit.paths(config.storage.root)
    return audit.read_log(log_file)


def test_ct_paired_meanwhile_is_skipped(make_setup: Callable[..., PrefetchSetup]) -> None:
    setup = make_setup()
    _waiting_ct(setup)
    node = setup.node
    prefetch.request_for_waiting(node.sessions, node.config)
    node.ingest(SMALL_MR, aet="MRSCANNER")  # the MR arrives the ordinary way first
    pairing.scan(node.sessions, node.config, now=later())
    _run(setup)
    (row,) = prefetches(node)
    assert row.state == PrefetchState.SKIPPED and "no longer waits" in row.reason
    assert row.retrievals == []


def test_stale_running_prefetch_is_taken_back(make_setup: Callable[..., PrefetchSetup]) -> None:
    setup = make_setup()
    _waiting_ct(setup)
    node = setup.node
    (pid,) = prefetch.request_for_waiting(node.sessions, node.config)
    long_ago = utcnow() - timedelta(hours=1)
    with node.sessions() as s:
        s.execute(
            update(Prefetch)
            .where(Prefetch.id == pid)
            .values(state=PrefetchState.RETRIEVING, owner="dead:1:x", heartbeat_at=long_ago)
        )
        s.add(
            Retrieval(
                prefetch_id=pid,
                series_uid=MR_SERIES,
                study_uid="1.2",
                state=RetrievalState.RETRIEVING,
                expected=N_MR,
                started_at=long_ago,
            )
        )
        s.commit()
    assert prefetch.recover_stale(node.sessions, node.config) == [pid]
    (row,) = prefetches(node)
    assert row.state == PrefetchState.RETRY and "interrupted" in row.reason
    assert row.retrievals[0].state == RetrievalState.FAILED


def test_manual_run_without_automatic_retries(
    make_setup: Callable[..., PrefetchSetup],
) -> None:
    setup = make_setup()
    node = setup.node
    node.config = node.config.model_copy(
        update={"prefetch": node.config.prefetch.model_copy(update={"enabled": False})}
    )
    patient = str(pydicom.dcmread(sorted(SMALL_CT.glob("*.dcm"))[0]).PatientID)
    with pytest.raises(UsageError, match="no patient"):
        prefetch.run_manual(node.sessions, node.config, node.store, patient)
    node.ingest(SMALL_CT, aet="CTSIM")
    pairing.scan(node.sessions, node.config, now=later())
    with pytest.raises(UsageError, match="issuer"):
        prefetch.run_manual(node.sessions, node.config, node.store, patient, issuer="X")
    setup.pacs.stop()
    pid = prefetch.run_manual(node.sessions, node.config, node.store, patient)
    (row,) = prefetches(node)
    assert row.id == pid and row.trigger == PrefetchTrigger.MANUAL
    assert row.state == PrefetchState.FAILED and "not retried" in row.reason
    assert prefetch.run_due(node.sessions, node.config, node.store, OWNER) == []


def test_disabled_prefetch_requests_nothing(make_setup: Callable[..., PrefetchSetup]) -> None:
    setup = make_setup()
    node = setup.node
    node.config = node.config.model_copy(
        update={"prefetch": node.config.prefetch.model_copy(update={"enabled": False})}
    )
    _waiting_ct(setup)
    assert prefetch.request_for_waiting(node.sessions, node.config) == []
    with node.sessions() as s:
        assert s.scalars(select(Prefetch)).all() == []
    latest = _waiting(node)[0]
    assert latest.outcome == PairingOutcome.WAITING


def test_mr_complete_before_its_retrieval_is_paired_after(
    make_setup: Callable[..., PrefetchSetup],
) -> None:
    """The retrieved MR completes (quiet period) while its retrieval is still open: pairing holds
    it; once the retrieval is recorded complete, pair_retrieved pairs the CT."""
    setup = make_setup()
    _waiting_ct(setup)
    node = setup.node
    (pid,) = prefetch.request_for_waiting(node.sessions, node.config)
    with node.sessions() as s:
        s.add(
            Retrieval(
                prefetch_id=pid,
                series_uid=MR_SERIES,
                study_uid=first_uid(SMALL_MR, "StudyInstanceUID"),
                state=RetrievalState.RETRIEVING,
                expected=N_MR,
                started_at=utcnow(),
            )
        )
        s.commit()
    node.ingest(SMALL_MR, aet="ORTHANC")  # what the C-MOVE brings
    pairing.scan(node.sessions, node.config, now=later())
    assert all_jobs(node) == []  # held: the retrieval is not complete yet
    assert prefetch.pair_retrieved(node.sessions, node.config, None) == []
    with node.sessions() as s:
        s.execute(update(Retrieval).values(state=RetrievalState.COMPLETE, completed=N_MR))
        s.execute(update(Prefetch).values(state=PrefetchState.RETRIEVED, finished_at=utcnow()))
        s.commit()
    assert prefetch.pair_retrieved(node.sessions, node.config, utcnow() + timedelta(1)) == []
    (job_id,) = prefetch.pair_retrieved(node.sessions, node.config, None)
    (job,) = all_jobs(node)
    assert job.id == job_id and job.mr_series_uid == MR_SERIES
    assert prefetch.pair_retrieved(node.sessions, node.config, None) == []  # idempotent
