"""``dicom-node jobs`` list/show/retry/cancel through the real command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.orchestration import pairing
from tests.support.data import SMALL_CT, SMALL_MR, copy_series, require_small_fixtures
from tests.support.indexed import IndexedNode
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
