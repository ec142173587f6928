"""The audit trail: record format, keyed patient hashes, the hash chain, several writers."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import multiprocessing
from pathlib import Path

import pytest

from dicom_node import audit
from dicom_node.config import NodeConfig
from dicom_node.config_watcher import ConfigChange
from dicom_node.states import AuditEvent, JobAction


def make_trail(folder: Path) -> audit.AuditTrail:
    return audit.AuditTrail(folder / "audit" / "log.jsonl", folder / "k.key", source_id="NODE")


def test_record_format_and_chain(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    calling = audit.Participant("CT_SIM", True, "application", "10.0.0.7", 4242, "CN=ct-sim")
    trail.association_start(
        calling=calling, called_aet="NODE", accepted=True, reason="accepted", listener="tls"
    )
    trail.association_start(
        calling=calling, called_aet="NODE", accepted=False, reason="calling AE", listener="tls"
    )
    first, second = audit.read_log(trail.log_file)
    assert first["v"] == audit.FORMAT_VERSION and first["event"] == "association-start"
    assert first["event_id"] == audit.USER_AUTHENTICATION.as_json()
    assert first["event_id"]["code"] == "110114"
    assert first["event_type"] == [{"code": "110122", "scheme": "DCM", "meaning": "Login"}]
    assert first["outcome"] == 0 and second["outcome"] == 4
    assert first["participants"][0] == {
        "user_id": "CT_SIM",
        "requestor": True,
        "role": "application",
        "address": "10.0.0.7",
        "port": 4242,
        "tls_subject": "CN=ct-sim",
    }
    assert first["source"]["id"] == "NODE" and first["prev"] is None
    lines = trail.log_file.read_bytes().splitlines()
    assert second["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert trail.log_file.stat().st_mode & 0o777 == 0o600
    assert trail.log_file.parent.stat().st_mode & 0o777 == 0o700
    assert audit.verify_log(trail.log_file).problems == []


def test_every_event_kind_has_codes() -> None:
    assert set(audit.EVENTS) == set(AuditEvent)
    for event_id, _type, action in audit.EVENTS.values():
        assert event_id.value.startswith("1101") and action in "CRUDE"


def test_patient_ids_are_keyed_hashes(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    transfers = audit.Transfers()
    transfers.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", patient_id="PID-0042", issuer="HOSP")
    transfers.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", patient_id="PID-0042", duplicate=True)
    assert transfers.instances == 2
    trail.association_end(
        calling=audit.Participant("CT_SIM", True, "application", "10.0.0.7", 4242),
        called_aet="NODE",
        how="released",
        transfers=transfers,
        failed=0,
        listener="plain",
    )
    end, received = audit.read_log(trail.log_file)
    assert end["event"] == "association-end" and end["detail"]["instances"] == 2
    assert received["event"] == "instances-received" and received["action"] == "C"
    assert received["outcome_text"] == "1 new, 1 already held"
    patient = next(o for o in received["objects"] if o["type"] == "patient")
    key = bytes.fromhex((tmp_path / "k.key").read_text().strip())
    digest = hmac.new(key, b"HOSP\x00PID-0042", hashlib.sha256).hexdigest()
    assert patient["id"] == f"hmac-sha256:{digest}"
    assert "PID-0042" not in trail.log_file.read_text()
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    # another installation (another key) hashes the same patient differently
    other = audit.AuditTrail(tmp_path / "o.jsonl", tmp_path / "o.key", source_id="X")
    assert other.patient_ref("PID-0042", "HOSP")["id"] != patient["id"]
    assert make_trail(tmp_path).patient_ref("PID-0042", "HOSP")["id"] == patient["id"]


def test_tampering_is_detected(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    for n in range(4):
        trail.job_action(JobAction.RETRY, n, result="queued again", user="admin")
    lines = trail.log_file.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["outcome_text"] = "nothing happened"
    lines[1] = json.dumps(edited, separators=(",", ":"))
    trail.log_file.write_text("\n".join(lines) + "\n")
    assert audit.verify_log(trail.log_file).problems == [
        "line 3: chain broken (a line before it changed)"
    ]
    del lines[1]
    trail.log_file.write_text("\n".join(lines) + "\n")
    assert len(audit.verify_log(trail.log_file).problems) == 1


def test_a_line_cut_short_stays_apart(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    trail.job_action(JobAction.CANCEL, 1, result="cancelled", user="admin")
    with trail.log_file.open("a") as f:
        f.write('{"v":1,"time":"cut')  # a crash mid-write
    trail.job_action(JobAction.CANCEL, 2, result="cancelled", user="admin")
    result = audit.verify_log(trail.log_file)
    assert result.records == 2
    assert result.problems == ["line 2: not JSON (cut short or edited)"]
    assert [r["objects"][0]["id"] for r in audit.read_log(trail.log_file)] == ["1", "2"]


def _write_many(folder: str, n: int) -> None:
    trail = make_trail(Path(folder))
    for i in range(n):
        trail.job_action(JobAction.RETRY, i, result="again", user="admin", patient_id="P-1")


def test_several_processes_append_one_chain(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log_file = tmp_path / "audit" / "log.jsonl"
    result = audit.verify_log(log_file)
    assert result.records == 100 and result.problems == []
    # the processes created the key concurrently and agreed on one
    hashes = {r["objects"][1]["id"] for r in audit.read_log(log_file)}
    assert hashes == {make_trail(tmp_path).patient_ref("P-1")["id"]}


def test_job_action_one_liner_and_trail_per_config(tmp_path: Path) -> None:
    cfg = NodeConfig.model_validate({"storage": {"root": str(tmp_path)}})
    assert audit.trail(cfg) is audit.trail(cfg)
    audit.job_action(
        cfg, JobAction.ACCEPT_REGISTRATION, 7, result="accepted", user="dr.who", patient_id="P1"
    )
    (record,) = audit.read_log(tmp_path / "audit" / "audit.jsonl")
    assert record["event"] == "job-action" and record["action"] == "U"
    assert record["event_id"]["meaning"] == "Procedure Record"
    assert record["outcome_text"] == "accept-registration: accepted"
    assert record["participants"] == [{"user_id": "dr.who", "requestor": True, "role": "user"}]
    assert [o["type"] for o in record["objects"]] == ["job", "patient"]
    moved = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"file": tmp_path / "b"})})
    assert audit.trail(moved) is not audit.trail(cfg)


def test_config_and_certificate_records(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    trail.config_change(
        ConfigChange(tmp_path / "node.yaml", True, ["node.allowed_calling_aets"], sha256="ab"),
        ae_title="NODE",
    )
    trail.config_change(
        ConfigChange(tmp_path / "node.yaml", False, error="node.port: bad"), ae_title="NODE"
    )
    trail.certificate_change(applied=True, reason="certificate files changed", files=[tmp_path])
    applied, rejected, cert = audit.read_log(trail.log_file)
    assert applied["detail"]["keys"] == ["node.allowed_calling_aets"]
    assert applied["event_type"][0]["code"] == "110128" and applied["outcome"] == 0
    assert rejected["outcome"] == 4 and rejected["outcome_text"] == "rejected: node.port: bad"
    assert cert["event_type"][0]["meaning"] == "Security Configuration"


def test_a_failing_write_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    trail = audit.AuditTrail(blocker / "log.jsonl", tmp_path / "k.key", source_id="NODE")
    with caplog.at_level(logging.ERROR):
        assert trail.record(AuditEvent.APPLICATION_START) is None
    assert "could not be written" in caplog.text
