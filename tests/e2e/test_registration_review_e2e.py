"""End to end: a registration the check refuses is reviewed, accepted and delivered.

DCMTK storescu sends the fixture CT and a left-right mirrored copy of the fixture MR to
``dicom-node serve``; the job fails as unreliable with its registration QA series and preview
in the job folder and nothing sent; ``dicom-node jobs accept-registration`` (a real process)
records the reviewer; the job is delivered to a real Orthanc whose route includes ``qa``: fused,
registered MR, REG and the QA series, every description flagged.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.errors import RegistrationUnreliableError
from dicom_node.states import DerivedKind, JobAction, JobState
from tests.peers.dcmtk_tools import storescu_folder
from tests.peers.node import (
    FAST_ORCHESTRATION,
    NODE_AET,
    IndexView,
    NodeProcess,
    node_command,
    node_config,
    start_node,
)
from tests.peers.orthanc import Orthanc
from tests.support.data import SMALL_CT, SMALL_MR, mirrored_series, require_small_fixtures

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(900)]

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
JOB_TIMEOUT = 420.0
ALL_KINDS = [str(k) for k in DerivedKind]


@pytest.fixture
def serve(tmp_path: Path, orthanc: Orthanc) -> Iterator[tuple[IndexView, Orthanc]]:
    """``dicom-node serve`` routing every kind, QA included, to one Orthanc."""
    require_small_fixtures()
    dest = {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    cfg = node_config(
        tmp_path,
        **FAST_ORCHESTRATION,
        destinations={"pacs": {**dest, "send": ALL_KINDS}},
        routing={"send_to": ["pacs"]},
    )
    node: NodeProcess = start_node(tmp_path, cfg)
    view = IndexView(node)
    yield view, orthanc
    view.close()
    if node.proc.poll() is None:
        node.kill()


def test_refused_registration_is_reviewed_accepted_and_delivered(
    tmp_path: Path, serve: tuple[IndexView, Orthanc]
) -> None:
    view, pacs = serve
    node = view.node
    mr = mirrored_series(SMALL_MR, tmp_path / "mirrored_mr")
    storescu_folder(node.port, SMALL_CT, calling="CTSIM", called=NODE_AET)
    storescu_folder(node.port, mr, calling="MRSCANNER", called=NODE_AET)

    (job,) = view.wait_jobs(1, states=(JobState.FAILED,), timeout=JOB_TIMEOUT)
    assert (job.error or "").startswith(RegistrationUnreliableError.__name__), job.error
    assert "flipped left-right" in (job.error or "")
    review = Path(job.output_dir or "")
    qa_files = sorted((review / "qa").glob("*.dcm"))
    assert len(qa_files) == 3 and (review / "preview.png").is_file()
    assert "UNRELIABLE - not accepted" in pydicom.dcmread(qa_files[0]).ImageComments
    assert not (review / "fused").exists() and pacs.sop_instance_uids() == set()

    accept = node_command(
        "--config",
        str(node.config_path),
        "jobs",
        "accept-registration",
        str(job.id),
        "--by",
        "Dr Review",
    )
    proc = subprocess.run(accept, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "registration accepted by Dr Review" in proc.stdout

    (job,) = view.wait_jobs(1, timeout=JOB_TIMEOUT)
    assert job.registration_accepted_by == "Dr Review"
    assert job.registration_accepted_at is not None
    series: dict[str, list[pydicom.Dataset]] = {}
    for ds in pacs.datasets_by_sop_uid().values():
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    assert len(series) == 4  # fused, registered MR, REG, QA
    qa = [items for items in series.values() if str(items[0].SOPClassUID) == SECONDARY_CAPTURE]
    assert len(qa) == 1 and len(qa[0]) == 3
    for ds in qa[0]:
        assert ds.SeriesDescription.startswith("CHECK REG!")
        assert "not for diagnosis" in ds.SeriesDescription
        assert "accepted by Dr Review" in ds.ImageComments
    images = [items for items in series.values() if items[0].Modality == "MR"]
    assert images and all(i[0].SeriesDescription.startswith("CHECK REG!") for i in images)
    accepts = [
        r
        for r in node.audit_records()
        if r["detail"].get("action") == JobAction.ACCEPT_REGISTRATION
    ]
    assert len(accepts) == 1 and accepts[0]["participants"][0]["user_id"] == "Dr Review"
