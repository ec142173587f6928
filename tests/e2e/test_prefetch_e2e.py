"""End to end with a real PACS: only the planning CT reaches ``dicom-node serve`` (DCMTK
storescu); the node finds the patient's MR in Orthanc, retrieves it (C-MOVE to its own AE
title, or C-GET), fuses, and the fused series, registered MR and REG object arrive in Orthanc.

The node runs as a subprocess with short quiet periods; every wait polls with a deadline.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.config import ENV_VAR
from dicom_node.models import Prefetch, Series
from dicom_node.states import PrefetchState, SendState
from tests.peers import free_port, wait_until
from tests.peers.dcmtk_tools import storescu_folder
from tests.peers.node import (
    FAST_ORCHESTRATION,
    JOB_TIMEOUT,
    NODE_AET,
    IndexView,
    node_command,
    node_config,
    start_node,
)
from tests.peers.orthanc import Orthanc
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.prefetch import (
    PACS,
    first_uid,
    pacs_destination,
    pacs_knowing_node,
    rewritten,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(300)]

REG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"
CT_FILES = sorted(SMALL_CT.glob("*.dcm"))


@pytest.fixture
def start_prefetching_node(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc]
) -> Iterator[Callable[..., tuple[IndexView, Orthanc]]]:
    """``start(method, **sections)``: a PACS that knows the node, then ``dicom-node serve``
    with prefetch from it (and sending its results to it)."""
    views: list[IndexView] = []

    def start(method: str, **sections: Any) -> tuple[IndexView, Orthanc]:
        require_small_fixtures()
        port = free_port()
        pacs = pacs_knowing_node(orthanc_factory, port)
        cfg = node_config(
            tmp_path,
            port=port,
            **{
                **FAST_ORCHESTRATION,
                "destinations": {PACS: pacs_destination(pacs)},
                "routing": {"send_to": [PACS]},
                "prefetch": {"enabled": True, "source": PACS, "method": method},
                **sections,
            },
        )
        view = IndexView(start_node(tmp_path, cfg))
        views.append(view)
        return view, pacs

    yield start
    for view in views:
        view.close()
        if view.node.proc.poll() is None:
            view.node.kill()


def _send_ct(view: IndexView) -> None:
    storescu_folder(view.node.port, SMALL_CT, calling="CTSIM", called=NODE_AET)


def _derived_in_pacs(pacs: Orthanc) -> dict[str, list[pydicom.Dataset]]:
    """The series of the CT's study in the PACS (only the node's results: the CT never went
    there), by SeriesInstanceUID."""
    ct_study = first_uid(SMALL_CT, "StudyInstanceUID")
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in pacs.datasets_by_sop_uid().values():
        if str(ds.StudyInstanceUID) == ct_study:
            out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return out


def _check_results(pacs: Orthanc, mr_for: str) -> None:
    """Fused series, registered MR (one slice per CT slice, DERIVED) and the REG object
    (CT frame of reference -> the retrieved MR's) are in the PACS."""
    series = _derived_in_pacs(pacs)
    regs = [s for s in series.values() if str(s[0].SOPClassUID) == REG_SOP_CLASS]
    images = [s for s in series.values() if str(s[0].SOPClassUID) != REG_SOP_CLASS]
    assert len(series) == 3 and len(regs) == 1 and len(images) == 2, list(series)
    ct_for = first_uid(SMALL_CT, "FrameOfReferenceUID")
    for items in images:
        assert len(items) == len(CT_FILES)
        assert all("DERIVED" in [str(v) for v in d.ImageType] for d in items)
        assert {str(d.FrameOfReferenceUID) for d in items} == {ct_for}
    (reg,) = regs[0]
    fors = [str(item.FrameOfReferenceUID) for item in reg.RegistrationSequence]
    assert fors == [ct_for, mr_for]


def _modalities_in_node(view: IndexView) -> dict[str, str]:
    with view.sessions() as s:
        return {r.series_instance_uid: r.modality or "" for r in s.scalars(select(Series))}


def _run_cli(view: IndexView, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run(
        node_command("--config", str(view.node.config_path), *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_mr_retrieved_by_move_is_fused_and_sent(
    tmp_path: Path, start_prefetching_node: Callable[..., tuple[IndexView, Orthanc]]
) -> None:
    """C-MOVE to the node's own AE title; a CT of the patient in the MR's study stays in the
    PACS (no other modality is fetched)."""
    view, pacs = start_prefetching_node("move")
    mr_study = first_uid(SMALL_MR, "StudyInstanceUID")
    prior_ct = rewritten(SMALL_CT, tmp_path / "prior", "prior-ct", StudyInstanceUID=mr_study)
    pacs.upload_folder(SMALL_MR)
    pacs.upload_folder(prior_ct)
    _send_ct(view)

    (job,) = view.wait_jobs(1)
    assert job.mr_series_uid == first_uid(SMALL_MR, "SeriesInstanceUID")
    assert [s.state for s in job.sends] == [SendState.DONE]
    _check_results(pacs, first_uid(SMALL_MR, "FrameOfReferenceUID"))
    assert sorted(_modalities_in_node(view).values()) == ["CT", "MR"]  # no prior CT
    shown = _run_cli(view, "jobs", "show", str(job.id))
    assert shown.returncode == 0, shown.stderr
    assert f"C-MOVE to {NODE_AET}" in shown.stdout and "complete" in shown.stdout
    assert "prefetch 1 (auto)" in shown.stdout and "retrieved" in shown.stdout


def test_pacs_down_then_mr_retrieved_by_get_is_fused_and_sent(
    start_prefetching_node: Callable[..., tuple[IndexView, Orthanc]],
) -> None:
    """The PACS is down when the CT arrives: the prefetch is retried with backoff (visible as
    "prefetching"); once the PACS is back, C-GET retrieves the MR and the job completes."""
    view, pacs = start_prefetching_node(
        "get", jobs={**FAST_ORCHESTRATION["jobs"], "max_backoff_seconds": 1.0}
    )
    pacs.upload_folder(SMALL_MR)
    pacs.stop()
    _send_ct(view)

    def retried() -> bool:
        with view.sessions() as s:
            row = s.scalars(select(Prefetch)).first()
            return row is not None and row.state == PrefetchState.RETRY and row.attempts >= 2

    wait_until(retried, timeout=JOB_TIMEOUT, interval=0.3, what="prefetch retried")

    def listed_as_retrying() -> bool:
        # The retry loop passes through "querying" every second: poll until the list is
        # taken between two attempts.
        out = _run_cli(view, "jobs", "list").stdout
        return "prefetching" in out and "prefetch retry" in out

    wait_until(listed_as_retrying, timeout=JOB_TIMEOUT, interval=0.2, what="listed as retrying")
    pacs.start()
    (job,) = view.wait_jobs(1)
    assert job.mr_series_uid == first_uid(SMALL_MR, "SeriesInstanceUID")
    _check_results(pacs, first_uid(SMALL_MR, "FrameOfReferenceUID"))
    with view.sessions() as s:
        (row,) = s.scalars(select(Prefetch)).all()
        assert row.state == PrefetchState.RETRIEVED and row.attempts >= 3


def test_no_mr_in_the_pacs_is_a_visible_outcome(
    start_prefetching_node: Callable[..., tuple[IndexView, Orthanc]],
) -> None:
    view, pacs = start_prefetching_node("move")
    pacs.upload_folder(SMALL_CT)  # the PACS knows the patient, but holds no MR
    _send_ct(view)

    def ended() -> Prefetch | None:
        with view.sessions() as s:
            row = s.scalars(select(Prefetch)).first()
            return row if row is not None and row.state == PrefetchState.NOT_FOUND else None

    row = wait_until(ended, timeout=60, interval=0.3, what="prefetch not_found")
    assert "no MR series of this patient" in row.reason
    listed = _run_cli(view, "jobs", "list")
    assert "waiting" in listed.stdout and "prefetch not_found" in listed.stdout
    patient = str(pydicom.dcmread(CT_FILES[0]).PatientID)
    shown = _run_cli(view, "prefetch", patient, "--show")
    assert "not_found" in shown.stdout and "0 study(ies)" in shown.stdout
    with view.sessions() as s:
        assert len(s.scalars(select(Prefetch)).all()) == 1  # not a loop
    assert view.jobs() == [] and sorted(_modalities_in_node(view).values()) == ["CT"]
