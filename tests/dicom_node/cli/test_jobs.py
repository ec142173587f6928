"""``dicom-node jobs`` list/show/retry/cancel/accept-registration through the real command
line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_node import audit
from dicom_node.cli import main
from dicom_node.errors import RegistrationUnreliableError
from dicom_node.models import Job
from dicom_node.orchestration import pairing
from dicom_node.states import JobAction, JobState
from tests.support.data import SMALL_CT, SMALL_MR, copy_series, require_small_fixtures
from tests.support.indexed import IndexedNode, make_indexed_node
from tests.support.jobs import make_jobs
from tests.support.time import later


def test_jobs_cli(
    indexed_node: IndexedNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dicom-node jobs`` list/show/retry/cancel through the real command line."""

    require_small_fixtures()
    node = indexed_node
    node.ingest(SMALL_CT)
    node.ingest(copy_series(SMALL_CT, tmp_path / "lonely", salt="lonely", patient_id="LONELY"))
    node.ingest(SMALL_MR)
    (job_id,) = pairing.scan(node.sessions, node.config, now=later()).jobs
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


def test_accept_registration_cli_records_logs_and_audits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``jobs accept-registration``: only a job refused as unreliable; who/when recorded in
    the job, shown by ``jobs show``, logged and in the audit trail."""
    node = make_indexed_node(tmp_path)
    try:
        refused, other = make_jobs(node, 2)
        with node.sessions() as s:
            for job_id, error in (
                (refused, f"{RegistrationUnreliableError.__name__}: registration unreliable"),
                (other, "SeriesError: unreadable"),
            ):
                s.execute(
                    Job.__table__.update()  # type: ignore[attr-defined]
                    .where(Job.id == job_id)
                    .values(state=JobState.FAILED, error=error)
                )
            s.commit()
    finally:
        node.close()
    cfg = ["--config", str(tmp_path / "node.yaml")]
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert main(["jobs", "accept-registration", str(refused), "--by", "Dr Test", *cfg]) == 0
    assert f"job {refused}: registration accepted by Dr Test" in capsys.readouterr().out
    assert any("accepted by Dr Test after review" in r.getMessage() for r in caplog.records)
    assert main(["jobs", "accept-registration", str(other), *cfg]) == 2
    assert "nothing to accept" in capsys.readouterr().out
    assert main(["jobs", "accept-registration", "999", *cfg]) == 2
    assert main(["jobs", "show", str(refused), *cfg]) == 0
    shown = capsys.readouterr().out
    assert "registration accepted" in shown and "Dr Test" in shown
    records = audit.read_log(tmp_path / "storage" / "audit" / "audit.jsonl")
    accepts = [r for r in records if r["detail"].get("action") == JobAction.ACCEPT_REGISTRATION]
    assert [r["outcome"] for r in accepts] == [0, 4, 4]
    assert accepts[0]["participants"][0]["user_id"] == "Dr Test"
