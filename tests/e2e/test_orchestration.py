"""Orchestration without the network: completion, pairing rules, job states, claims, sends
bookkeeping and retention, on a real index filled through the node's Store."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node import models
from dicom_node.config import NodeConfig
from dicom_node.models import Job, PairingDecision, Send, SeriesProgress
from dicom_node.orchestration import dispatch, jobs, pairing
from dicom_node.storage import retention
from tests.e2e.conftest import (
    CT_DIR,
    MR_DIR,
    IndexedNode,
    copy_series,
    require_small_fixtures,
)
from tests.peers import free_port

LATER = timedelta(seconds=5)


def _later() -> datetime:
    return models.utcnow() + LATER


def _jobs(node: IndexedNode) -> list[Job]:
    with node.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)).all())


def _info(**kw: object) -> pairing.SeriesInfo:
    base: dict[str, object] = dict(
        series_uid="1.2.3",
        study_uid="1.2",
        patient_id="P1",
        issuer="",
        modality="MR",
        description="T2",
        image_type=("ORIGINAL", "PRIMARY"),
        orientation=(1, 0, 0, 0, 1, 0),
        num_instances=40,
        acquired_at=datetime(2020, 1, 1),
        revision=1,
    )
    base.update(kw)
    return pairing.SeriesInfo(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pure rules
def test_choose_mr_prefers_rule_then_time() -> None:
    ct = _info(series_uid="ct", modality="CT", acquired_at=datetime(2020, 3, 1))
    near = _info(series_uid="near", description="T2 tse", acquired_at=datetime(2020, 2, 25))
    ruled = _info(
        series_uid="ruled", description="T1 post-contrast", acquired_at=datetime(2020, 1, 10)
    )
    far = _info(series_uid="far", description="T1 post-contrast", acquired_at=datetime(2019, 1, 1))
    other = _info(series_uid="other", patient_id="P2", acquired_at=datetime(2020, 3, 1))
    rules = [(r"(?i)t1.*post", 1.0)]
    choice = pairing.choose_mr(ct, [near, ruled, far, other], max_days=90, rules=rules)
    assert choice.mr is not None and choice.mr.series_uid == "ruled"
    assert "T1.*post".lower() in choice.reason.lower() and "near" in choice.reason
    assert any(r.startswith("far:") for r in choice.rejected)
    assert "other" not in choice.reason  # another patient is not even considered
    no_rules = pairing.choose_mr(ct, [near, ruled, far], max_days=90, rules=[])
    assert no_rules.mr is not None and no_rules.mr.series_uid == "near"


def test_eligibility_rules() -> None:
    ct = _info(modality="CT", num_instances=69)
    assert pairing.ct_eligibility(ct, 20) is None
    assert "min_slices" in (pairing.ct_eligibility(_info(modality="CT", num_instances=5), 20) or "")
    scout = _info(modality="CT", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert pairing.ct_eligibility(scout, 20) == "localizer/scout"
    topo = _info(modality="CT", description="Topogram 0.6 T20s")
    assert pairing.ct_eligibility(topo, 20) == "localizer/scout"
    sagittal = _info(modality="CT", orientation=(0, 1, 0, 0, 0, -1))
    assert pairing.ct_eligibility(sagittal, 20) == "not axial"
    assert pairing.mr_eligibility(_info(image_type=("DERIVED", "SECONDARY"))) is not None
    # issuer must match exactly
    assert not pairing.same_patient(_info(issuer="A"), _info(issuer=""))
    assert pairing.same_patient(_info(issuer="A"), _info(issuer="A"))


def test_parsers() -> None:
    assert pairing.parse_dicom_datetime("19900202", "101530.5") == datetime(1990, 2, 2, 10, 15, 30)
    assert pairing.parse_dicom_datetime("", "1015") is None
    assert pairing.parse_orientation("1\\0\\0\\0\\1\\0") == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert pairing.parse_multi("ORIGINAL\\PRIMARY\\AXIAL") == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert jobs.backoff_seconds(1, 2, 100) == 2 and jobs.backoff_seconds(4, 2, 10) == 10


# --------------------------------------------------------------------------- on the index
def test_quiet_period_pairing_and_waiting(indexed_node: IndexedNode, tmp_path: Path) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(CT_DIR, aet="CTSCANNER")
    # not quiet yet: nothing happens
    assert pairing.scan(node.sessions, node.config).completed == []
    result = pairing.scan(node.sessions, node.config, now=_later())
    assert len(result.completed) == 1 and result.waiting and not result.jobs
    # a second patient's MR must not be paired with this CT
    other_mr = copy_series(MR_DIR, tmp_path / "other_mr", salt="p2", patient_id="OTHER-2")
    node.ingest(other_mr, aet="MRSCANNER")
    result = pairing.scan(node.sessions, node.config, now=_later())
    assert not result.jobs
    # the MR of the same patient arrives after the CT and triggers the pairing
    node.ingest(MR_DIR, aet="MRSCANNER")
    result = pairing.scan(node.sessions, node.config, now=_later() + LATER)
    assert len(result.jobs) == 1
    (job,) = _jobs(node)
    assert job.state == jobs.QUEUED and job.revision == 0
    assert "32.0 days before the CT" in job.pairing_reason
    with node.sessions() as s:
        outcomes = [d.outcome for d in s.scalars(select(PairingDecision)).all()]
    assert outcomes[0] == pairing.WAITING and outcomes[-1] == pairing.PAIRED
    # scanning again changes nothing
    assert pairing.scan(node.sessions, node.config, now=_later() + 2 * LATER).jobs == []
    assert len(_jobs(node)) == 1


def test_resend_identical_is_noop_changed_series_reprocessed(
    indexed_node: IndexedNode, tmp_path: Path
) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(CT_DIR)
    node.ingest(MR_DIR)
    assert len(pairing.scan(node.sessions, node.config, now=_later()).jobs) == 1
    node.ingest(CT_DIR)  # identical re-send
    assert pairing.scan(node.sessions, node.config, now=_later() + LATER).jobs == []
    # one more CT instance (new SOP UID, same series): the CT changed -> new job, new revision
    import pydicom

    first = sorted(CT_DIR.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [-999.0]
    extra = tmp_path / "extra"
    extra.mkdir()
    ds.save_as(extra / "x.dcm", enforce_file_format=True)
    node.ingest(extra)
    result = pairing.scan(node.sessions, node.config, now=_later() + 2 * LATER)
    assert len(result.jobs) == 1
    first_job, second_job = _jobs(node)
    assert (first_job.ct_revision, second_job.ct_revision) == (1, 2)
    assert (first_job.revision, second_job.revision) == (0, 1)
    with node.sessions() as s:
        prog = s.get(SeriesProgress, second_job.ct_series_uid)
        assert prog is not None and prog.instance_count == 70


def test_per_aet_quiet_and_not_eligible(indexed_node: IndexedNode, tmp_path: Path) -> None:
    require_small_fixtures()
    node = indexed_node
    cfg = node.config.model_copy(
        update={
            "pairing": node.config.pairing.model_copy(
                update={"per_aet_quiet_seconds": {"SLOWPACS": 3600.0}, "min_slices": 100}
            )
        }
    )
    node.ingest(CT_DIR, aet="SLOWPACS")
    assert pairing.scan(node.sessions, cfg, now=_later()).completed == []
    node.ingest(copy_series(CT_DIR, tmp_path / "ct2", salt="x"), aet="FAST")
    result = pairing.scan(node.sessions, cfg, now=_later())
    assert len(result.completed) == 1 and not result.jobs
    with node.sessions() as s:
        d = s.scalars(select(PairingDecision)).one()
    assert d.outcome == pairing.IGNORED and "min_slices" in d.reason


def test_waiting_ct_expires(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(CT_DIR)
    pairing.scan(node.sessions, node.config, now=_later())
    with node.sessions() as s:
        assert len(pairing.waiting_cts(s)) == 1
    result = pairing.scan(node.sessions, node.config, now=_later() + timedelta(days=91))
    assert len(result.expired) == 1
    with node.sessions() as s:
        assert pairing.waiting_cts(s) == []


# --------------------------------------------------------------------------- jobs
def _make_jobs(node: IndexedNode, n: int) -> list[int]:
    ids = []
    with node.sessions() as s:
        for i in range(n):
            job = jobs.create_job(
                s,
                patient_id="P",
                issuer_of_patient_id="",
                ct_series_uid=f"1.{i}",
                mr_series_uid=f"2.{i}",
                ct_revision=1,
                mr_revision=1,
                pairing_reason="test",
            )
            ids.append(job.id)
        s.commit()
    return ids


def test_claim_is_atomic_across_threads(indexed_node: IndexedNode) -> None:
    node = indexed_node
    ids = _make_jobs(node, 20)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            got = jobs.claim_next(node.sessions, name)
            if got is None:
                return
            with lock:
                claimed.append(got)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == ids  # every job exactly once


def test_failures_retry_then_fail_and_recovery(indexed_node: IndexedNode) -> None:
    node = indexed_node
    cfg = jobs.settings(node.config)
    (job_id,) = _make_jobs(node, 1)
    for attempt in range(1, cfg.max_attempts + 1):
        with node.sessions() as s:
            s.execute(Job.__table__.update().values(not_before=None))  # type: ignore[attr-defined]
            s.commit()
        assert jobs.claim_next(node.sessions, "w") == job_id
        assert jobs.enter_stage(node.sessions, job_id, "w", jobs.FUSING)
        state = jobs.fail_attempt(node.sessions, job_id, "w", f"boom {attempt}", cfg)
        assert state == (jobs.FAILED if attempt == cfg.max_attempts else jobs.QUEUED)
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.error == "boom 3" and len(job.stages) >= 3
    # a data error fails at once
    (data_job,) = _make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "w") == data_job
    assert (
        jobs.fail_attempt(node.sessions, data_job, "w", "SeriesError", cfg, permanent=True)
        == jobs.FAILED
    )
    # the next job is not blocked by the failed ones
    (other,) = _make_jobs(node, 1)
    assert jobs.claim_next(node.sessions, "w2") == other
    # worker dies: its heartbeat goes stale and the job is requeued
    with node.sessions() as s:
        s.execute(
            Job.__table__.update()
            .where(Job.id == other)
            .values(  # type: ignore[attr-defined]
                heartbeat_at=models.utcnow() - timedelta(hours=1)
            )
        )
        s.commit()
    assert jobs.heartbeat(node.sessions, other, "w-other") is False
    assert jobs.recover_stale(node.sessions, cfg) == [other]
    assert jobs.claim_next(node.sessions, "w3") == other
    # admin retry / cancel
    assert "queued again" in jobs.retry_job(node.sessions, job_id)
    assert "cancelled" in jobs.cancel_job(node.sessions, other)
    assert jobs.heartbeat(node.sessions, other, "w3") is False  # the worker notices
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == jobs.QUEUED and job.attempts == 0


def _dest_config(node: IndexedNode, port: int, **jobs_kw: object) -> NodeConfig:
    data = node.config.model_dump(mode="json")
    data["destinations"] = {
        "pacs": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": port},
        "tps": {"ae_title": "NOBODY2", "host": "127.0.0.1", "port": port, "send": ["reg"]},
    }
    data["routing"] = {"send_to": ["pacs", "tps"]}
    data["jobs"] = {**data["jobs"], **jobs_kw}
    return NodeConfig.model_validate(data)


def test_send_to_unreachable_destination_retries_then_fails(
    indexed_node: IndexedNode, tmp_path: Path
) -> None:
    require_small_fixtures()
    node = indexed_node
    config = _dest_config(node, free_port(), retry_backoff_seconds=0.0, send_max_attempts=2)
    (job_id,) = _make_jobs(node, 1)
    folder = dispatch.job_dir(config, job_id)
    (folder / "fused").mkdir(parents=True)
    (folder / "reg").mkdir(parents=True)
    src = sorted(CT_DIR.glob("*.dcm"))[:2]
    files = []
    for i, f in enumerate(src):
        kind = "fused" if i == 0 else "reg"
        dst = folder / kind / f.name
        dst.write_bytes(f.read_bytes())
        import pydicom

        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        files.append(
            dispatch.DerivedFile(kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), dst)
        )
    dispatch.write_manifest(folder, files, {"job": job_id})
    assert dispatch.read_manifest(folder) == files
    assert jobs.claim_next(node.sessions, "w") == job_id
    assert jobs.enter_stage(node.sessions, job_id, "w", jobs.SENDING)
    states = dispatch.send_job(node.sessions, config, job_id, "w", files)
    assert states == {"pacs": jobs.SEND_RETRY, "tps": jobs.SEND_RETRY}
    with node.sessions() as s:
        totals = {x.destination: x.total for x in s.scalars(select(Send)).all()}
    assert totals == {"pacs": 2, "tps": 1}  # the TPS gets only the REG kind
    assert jobs.release_to_sends(node.sessions, job_id, "w")
    assert jobs.finish_if_sent(node.sessions, job_id) is None  # sends still retrying
    assert dispatch.retry_due_sends(node.sessions, config, "sched") == 2
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == jobs.FAILED and "pacs" in (job.error or "")


def test_retention_cleans_old_done_jobs(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(CT_DIR)
    node.ingest(MR_DIR)
    (job_id,) = pairing.scan(node.sessions, node.config, now=_later()).jobs
    folder = dispatch.job_dir(node.config, job_id)
    folder.mkdir(parents=True)
    (folder / "x.dcm").write_bytes(b"x")
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.finished_at = jobs.DONE, models.utcnow() - timedelta(days=40)
        s.commit()
    assert retention.clean(node.sessions, node.config).jobs == []  # off by default
    cfg = node.config.model_copy(
        update={"retention": node.config.retention.model_copy(update={"enabled": True, "days": 30})}
    )
    result = retention.clean(node.sessions, cfg)
    assert result.jobs == [job_id] and len(result.series) == 2
    assert not folder.exists()
    assert not any(node.config.storage.root.rglob("*.dcm"))
    assert retention.clean(node.sessions, cfg).jobs == []


def test_jobs_cli(
    indexed_node: IndexedNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dicom-node jobs`` list/show/retry/cancel through the real command line."""
    from dicom_node.cli import main

    require_small_fixtures()
    node = indexed_node
    node.ingest(CT_DIR)
    node.ingest(copy_series(CT_DIR, tmp_path / "lonely", salt="lonely", patient_id="LONELY"))
    node.ingest(MR_DIR)
    (job_id,) = pairing.scan(node.sessions, node.config, now=_later()).jobs
    cfg = ["--config", str(tmp_path / "node.yaml")]
    assert main(["jobs", "list", *cfg]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "waiting" in out and "LONELY" in out
    assert main(["jobs", "show", str(job_id), *cfg]) == 0
    out = capsys.readouterr().out
    assert "days before the CT" in out and "pairing decisions" in out
    assert main(["jobs", "cancel", str(job_id), *cfg]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert main(["jobs", "list", "--state", "cancelled", *cfg]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert main(["jobs", "retry", str(job_id), *cfg]) == 0
    assert "queued again" in capsys.readouterr().out
    assert main(["jobs", "show", "999", *cfg]) == 2


def test_job_of_dead_local_worker_recovered_at_once(indexed_node: IndexedNode) -> None:
    """A job held by a process of this host that no longer exists is requeued without
    waiting for its lease to expire; a live holder keeps its job."""
    import socket
    import subprocess
    import sys

    node = indexed_node
    cfg = jobs.settings(node.config)
    host = socket.gethostname()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_id = f"{host}:{int(gone.stdout)}:dead"
    live_id = f"{host}:{__import__('os').getpid()}:live"
    a, b = _make_jobs(node, 2)
    assert jobs.claim_next(node.sessions, dead_id) == a
    assert jobs.claim_next(node.sessions, live_id) == b
    assert jobs.recover_stale(node.sessions, cfg) == []  # leases still fresh
    assert jobs.recover_stale(node.sessions, cfg, local_host=host) == [a]
    with node.sessions() as s:
        states = {j.id: j.state for j in s.scalars(select(Job)).all()}
    assert states == {a: jobs.QUEUED, b: jobs.REGISTERING}


def test_changed_mr_repairs_its_ct(indexed_node: IndexedNode, tmp_path: Path) -> None:
    """An instance added to the MR after its job: the CT is paired again with the new MR
    revision (new job, new output revision)."""
    import pydicom

    require_small_fixtures()
    node = indexed_node
    node.ingest(CT_DIR)
    node.ingest(MR_DIR)
    assert len(pairing.scan(node.sessions, node.config, now=_later()).jobs) == 1
    ds = pydicom.dcmread(sorted(MR_DIR.glob("*.dcm"))[0])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    extra = tmp_path / "mr_extra"
    extra.mkdir()
    ds.save_as(extra / "x.dcm", enforce_file_format=True)
    node.ingest(extra)
    assert len(pairing.scan(node.sessions, node.config, now=_later() + LATER).jobs) == 1
    first, second = _jobs(node)
    assert (first.mr_revision, second.mr_revision) == (1, 2)
    assert second.ct_series_uid == first.ct_series_uid and second.revision == 1
