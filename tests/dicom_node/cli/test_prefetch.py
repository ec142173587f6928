"""``dicom-node prefetch PATIENT_ID`` and the prefetch views of ``dicom-node jobs``, through the
real command line against a real Orthanc."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.cli import main
from dicom_node.errors import EXIT_NETWORK, EXIT_OK, EXIT_USAGE
from dicom_node.orchestration import pairing, prefetch
from tests.peers.orthanc import Orthanc
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.prefetch import first_uid, prefetch_setup
from tests.support.time import later

pytestmark = pytest.mark.peers


def test_prefetch_command_and_jobs_views(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc], capsys: pytest.CaptureFixture[str]
) -> None:
    require_small_fixtures()
    setup = prefetch_setup(tmp_path, orthanc_factory, method="get")
    node = setup.node
    cfg = ["--config", str(tmp_path / "node.yaml")]
    patient = str(pydicom.dcmread(sorted(SMALL_CT.glob("*.dcm"))[0]).PatientID)
    mr_uid = first_uid(SMALL_MR, "SeriesInstanceUID")
    try:
        assert main(["prefetch", "NOBODY", *cfg]) == EXIT_USAGE
        assert "no patient" in capsys.readouterr().err
        node.ingest(SMALL_CT, aet="CTSIM")
        pairing.scan(node.sessions, node.config, now=later())

        # the scheduler's request, before it runs: the CT shows as "prefetching"
        prefetch.request_for_waiting(node.sessions, node.config)
        assert main(["jobs", "list", "--state", "prefetching", *cfg]) == EXIT_OK
        out = capsys.readouterr().out
        assert "prefetching" in out and patient in out and "prefetch pending" in out

        # the PACS is empty: "no MR found" is an answer (exit 0), printed with the query
        assert main(["prefetch", patient, *cfg]) == EXIT_OK
        out = capsys.readouterr().out
        assert "not_found" in out and "no MR series of this patient" in out and "query" in out

        setup.pacs.upload_folder(SMALL_MR)
        assert main(["prefetch", patient, *cfg]) == EXIT_OK
        out = capsys.readouterr().out
        assert "retrieved" in out and "C-GET" in out and mr_uid in out
        assert "chosen" in out and "choice" in out

        assert main(["prefetch", patient, "--show", *cfg]) == EXIT_OK
        shown = capsys.readouterr().out
        assert shown.count("(manual) for CT") == 2 and "not_found" in shown

        (job_id,) = pairing.scan(node.sessions, node.config, now=later()).jobs
        assert main(["jobs", "show", str(job_id), *cfg]) == EXIT_OK
        out = capsys.readouterr().out
        assert "prefetch" in out and "retrieve" in out and mr_uid in out

        setup.pacs.stop()  # a PACS that is down: a network failure, exit 69
        assert main(["prefetch", patient, *cfg]) == EXIT_NETWORK
        assert "cannot connect" in capsys.readouterr().out
    finally:
        node.close()
