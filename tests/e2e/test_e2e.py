"""End to end with real peers: DCMTK storescu -> ``dicom-node serve`` -> real Orthanc.

The node runs as a subprocess (SCP + scheduler + embedded worker process) on free loopback
ports with short quiet periods; every wait polls with a deadline.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.models import Series, SeriesProgress
from dicom_node.states import JobState, SendState
from tests.peers import wait_until
from tests.peers.dcmtk_tools import storescu_folder
from tests.peers.node import (
    FAST_ORCHESTRATION,
    JOB_TIMEOUT,
    NODE_AET,
    IndexView,
    NodeProcess,
    node_config,
    start_node,
)
from tests.peers.orthanc import Orthanc
from tests.support.data import SMALL_CT, SMALL_MR, copy_series, require_small_fixtures

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(300)]

REG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"


def _dest(o: Orthanc, send: list[str] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"ae_title": o.aet, "host": "127.0.0.1", "port": o.dicom_port}
    if send is not None:
        d["send"] = send
    return d


def storescu(port: int, folder: Path, *, calling_aet: str) -> None:
    """Send a folder to the node with DCMTK storescu (raises when it fails)."""
    storescu_folder(port, folder, calling=calling_aet, called=NODE_AET)


class Node(IndexView):
    """A started ``dicom-node serve`` and views of its index."""

    @property
    def port(self) -> int:
        """The node's DICOM port."""
        return self.node.port

    @property
    def proc(self) -> NodeProcess:
        """The serve process."""
        return self.node


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start ``dicom-node serve`` with the fast test config plus ``sections``."""
    nodes: list[Node] = []

    def start(**sections: Any) -> Node:
        cfg = node_config(tmp_path, **{**FAST_ORCHESTRATION, **sections})
        node = Node(start_node(tmp_path, cfg))
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.close()
        if node.proc.proc.poll() is None:
            node.proc.kill()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[NodeProcess], NodeProcess]]:
    """Start a ``dicom-node worker`` on a serve's config; killed at teardown."""
    workers: list[NodeProcess] = []

    def start(serve: NodeProcess) -> NodeProcess:
        worker = start_node(tmp_path, serve.config, command="worker", wait_for_port=False)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.proc.poll() is None:
            worker.kill()


def _series_by_uid(o: Orthanc) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in o.datasets_by_sop_uid().values():
        out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return out


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]


def _check_outputs(
    series: dict[str, list[pydicom.Dataset]], ct: list[pydicom.Dataset], mr: list[pydicom.Dataset]
) -> None:
    """Fused, registered MR and REG for this CT/MR: geometry, Frame of Reference, references."""
    ct_for = str(ct[0].FrameOfReferenceUID)
    ct_study = str(ct[0].StudyInstanceUID)
    ct_sops = {str(d.SOPInstanceUID) for d in ct}
    ct_pos = {tuple(round(float(v), 2) for v in d.ImagePositionPatient) for d in ct}
    mine = {
        uid: items for uid, items in series.items() if str(items[0].StudyInstanceUID) == ct_study
    }
    assert len(mine) == 3, {u: (i[0].Modality, len(i)) for u, i in mine.items()}
    regs = [i for i in mine.values() if str(i[0].SOPClassUID) == REG_SOP_CLASS]
    images = [i for i in mine.values() if str(i[0].SOPClassUID) != REG_SOP_CLASS]
    assert len(regs) == 1 and len(regs[0]) == 1 and len(images) == 2
    mr_sops = {str(d.SOPInstanceUID) for d in mr}
    referenced_ct: set[str] = set()
    for items in images:
        assert len(items) == len(ct)  # one derived slice per CT slice
        for d in items:
            assert str(d.FrameOfReferenceUID) == ct_for
            assert (d.Rows, d.Columns) == (ct[0].Rows, ct[0].Columns)
            assert np.allclose(
                [float(v) for v in d.PixelSpacing],
                [float(v) for v in ct[0].PixelSpacing],
                atol=1e-4,
            )
            assert np.allclose(
                [float(v) for v in d.ImageOrientationPatient],
                [float(v) for v in ct[0].ImageOrientationPatient],
                atol=1e-4,
            )
            assert tuple(round(float(v), 2) for v in d.ImagePositionPatient) in ct_pos
            assert str(d.PatientID) == str(ct[0].PatientID)
            assert "DERIVED" in [str(v) for v in d.ImageType]
            refs = {str(r.ReferencedSOPInstanceUID) for r in d.get("SourceImageSequence", [])}
            assert refs <= ct_sops | mr_sops, "a slice must reference only its own sources"
            referenced_ct |= refs & ct_sops
    assert referenced_ct == ct_sops  # the fused series references every CT slice
    (reg,) = regs[0]
    assert reg.Modality == "REG" and str(reg.FrameOfReferenceUID) == ct_for
    fors = [str(item.FrameOfReferenceUID) for item in reg.RegistrationSequence]
    assert fors == [ct_for, str(mr[0].FrameOfReferenceUID)]
    m = np.array(
        [
            float(v)
            for v in reg.RegistrationSequence[1]
            .MatrixRegistrationSequence[0]
            .MatrixSequence[0]
            .FrameOfReferenceTransformationMatrix
        ]
    ).reshape(4, 4)
    assert np.allclose(m[3], [0, 0, 0, 1]) and np.allclose(
        m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-3
    )
    reg_refs = {
        str(r.ReferencedSOPInstanceUID)
        for item in reg.RegistrationSequence
        for r in item.ReferencedImageSequence
    }
    assert ct_sops <= reg_refs and mr_sops <= reg_refs


def test_two_patients_interleaved_paired_fused_and_sent(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc], start_serve: Callable[..., Node]
) -> None:
    """CT and MR of patient A from two calling AEs, patient B's arriving in the middle:
    two jobs, nothing mixed, everything in the PACS, only fused + REG in the TPS."""
    require_small_fixtures()
    pacs = orthanc_factory()
    tps = orthanc_factory(aet="TPS")
    node = start_serve(
        destinations={"pacs": _dest(pacs), "tps": _dest(tps, ["fused", "reg"])},
        routing={"send_to": ["pacs", "tps"]},
    )
    b_ct = copy_series(SMALL_CT, tmp_path / "b_ct", salt="patient-b", patient_id="E2E-B")
    b_mr = copy_series(SMALL_MR, tmp_path / "b_mr", salt="patient-b", patient_id="E2E-B")
    storescu(node.port, SMALL_CT, calling_aet="CTSIM")
    storescu(node.port, b_ct, calling_aet="CTSIM")  # patient B arrives in the middle
    storescu(node.port, SMALL_MR, calling_aet="MRSCANNER")
    storescu(node.port, b_mr, calling_aet="MRSCANNER")

    jobs = node.wait_jobs(2)
    assert len(jobs) == 2
    a_ct, a_mr = _headers(SMALL_CT), _headers(SMALL_MR)
    bct, bmr = _headers(b_ct), _headers(b_mr)
    pairs = {(j.ct_series_uid, j.mr_series_uid) for j in jobs}
    assert pairs == {
        (str(a_ct[0].SeriesInstanceUID), str(a_mr[0].SeriesInstanceUID)),
        (str(bct[0].SeriesInstanceUID), str(bmr[0].SeriesInstanceUID)),
    }
    for j in jobs:
        assert "days before the CT" in j.pairing_reason
        assert {s.destination: s.state for s in j.sends} == {
            "pacs": SendState.DONE,
            "tps": SendState.DONE,
        }

    series = _series_by_uid(pacs)
    assert len(series) == 6
    _check_outputs(series, a_ct, a_mr)
    _check_outputs(series, bct, bmr)
    tps_series = _series_by_uid(tps)
    assert len(tps_series) == 4  # fused + REG of each patient, no registered MR
    assert sum(len(v) for v in tps_series.values()) == 2 * (len(a_ct) + 1)
    # identical re-send of a CT changes nothing (no new job)
    n_ct = len(a_ct)
    storescu(node.port, SMALL_CT, calling_aet="CTSIM")
    wait_until(
        lambda: f"({n_ct} duplicates)" in node.proc.log_tail(10**7),
        timeout=30,
        what="duplicate re-send logged",
    )
    assert _scan_settled(node) and len(node.jobs()) == 2


def _scan_settled(node: Node) -> bool:
    with node.sessions() as s:
        rows = s.execute(
            select(Series.last_received_at, SeriesProgress.last_received_at).join(
                SeriesProgress, SeriesProgress.series_uid == Series.series_instance_uid
            )
        ).all()
    return bool(rows) and all(a == b for a, b in rows)


def test_worker_killed_mid_job_is_taken_up_again(
    tmp_path: Path,
    orthanc_factory: Callable[..., Orthanc],
    start_serve: Callable[..., Node],
    start_worker: Callable[[NodeProcess], NodeProcess],
) -> None:
    """Serve (with its embedded worker) plus one ``dicom-node worker``; SIGKILL whichever
    worker fuses: the stale lease is recovered, the job finishes on attempt 2, and Orthanc
    holds each derived instance once (an embedded worker is also restarted by serve)."""
    require_small_fixtures()
    pacs = orthanc_factory()
    node = start_serve(
        destinations={"pacs": _dest(pacs)},
        routing={"send_to": ["pacs"]},
        jobs={"lease_seconds": 3.0, "heartbeat_seconds": 0.5},
    )
    extra = start_worker(node.proc)
    wait_until(lambda: "started (device" in extra.log_tail(), timeout=60, what="extra worker")
    storescu(node.port, SMALL_CT, calling_aet="CTSIM")
    storescu(node.port, SMALL_MR, calling_aet="MRSCANNER")
    (running,) = node.wait_jobs(1, states=(JobState.FUSING,))
    assert running.worker_id is not None
    pid = int(running.worker_id.split(":")[1])
    os.kill(pid, signal.SIGKILL)
    (job,) = node.wait_jobs(1)
    assert job.attempts == 2
    assert any(st.error and "stopped answering" in st.error for st in job.stages)
    if pid == extra.proc.pid:
        assert extra.proc.wait(10) == -signal.SIGKILL
    else:  # the embedded worker died: serve restarted it
        assert "died" in node.proc.log_tail(10**7)
    series = _series_by_uid(pacs)
    assert len(series) == 3
    counts = sorted(len(v) for v in series.values())
    n_ct = len(list(SMALL_CT.glob("*.dcm")))
    assert counts == [1, n_ct, n_ct]
    assert pacs.statistics()["CountInstances"] == 1 + 2 * n_ct


def test_destination_down_job_waits_then_completes(
    orthanc_factory: Callable[..., Orthanc], start_serve: Callable[..., Node]
) -> None:
    """The PACS is down while the job sends: the send waits in retry with backoff, and the
    job completes once the PACS is back; nothing acknowledged is sent twice."""
    require_small_fixtures()
    pacs = orthanc_factory()
    pacs.stop()
    node = start_serve(
        destinations={"pacs": _dest(pacs)},
        routing={"send_to": ["pacs"]},
        jobs={"retry_backoff_seconds": 0.5, "max_backoff_seconds": 2.0, "send_max_attempts": 100},
    )
    storescu(node.port, SMALL_CT, calling_aet="CTSIM")
    storescu(node.port, SMALL_MR, calling_aet="MRSCANNER")

    def retrying() -> bool:
        sends = node.sends()
        return bool(sends) and sends[0].state == SendState.RETRY and sends[0].attempts >= 2

    wait_until(retrying, timeout=JOB_TIMEOUT, interval=0.3, what="send in retry")
    (job,) = node.jobs()
    assert job.state == JobState.SENDING and job.worker_id is None
    pacs.start()
    (job,) = node.wait_jobs(1)
    (send,) = job.sends
    assert send.state == SendState.DONE and send.attempts >= 3 and send.acked == send.total
    n_ct = len(list(SMALL_CT.glob("*.dcm")))
    assert pacs.statistics()["CountInstances"] == 1 + 2 * n_ct
