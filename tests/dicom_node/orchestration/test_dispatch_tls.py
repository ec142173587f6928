"""Dispatch over DICOM TLS to a real Orthanc that requires our client certificate, audited."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node import audit
from dicom_node.config import NodeConfig
from dicom_node.orchestration import dispatch, jobs
from dicom_node.states import DerivedKind, JobState, SendState
from dicom_node.storage.derived import DerivedFile, job_dir, write_manifest
from tests.peers.certs import destination_tls_section, make_world
from tests.peers.orthanc import Orthanc, OrthancTls
from tests.support.data import SMALL_CT, require_small_fixtures
from tests.support.indexed import IndexedNode
from tests.support.jobs import make_jobs

pytestmark = [pytest.mark.peers]


def _derived(config: NodeConfig, job_id: int, n: int) -> list[DerivedFile]:
    """``n`` CT fixture files standing in for a job's fused series, with their manifest."""
    folder = job_dir(config, job_id)
    (folder / DerivedKind.FUSED).mkdir(parents=True)
    files = []
    for f in sorted(SMALL_CT.glob("*.dcm"))[:n]:
        dst = folder / DerivedKind.FUSED / f.name
        dst.write_bytes(f.read_bytes())
        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        files.append(
            DerivedFile(DerivedKind.FUSED, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), dst)
        )
    write_manifest(folder, files, {"job": job_id})
    return files


def test_dispatch_to_tls_orthanc_sends_and_audits(
    indexed_node: IndexedNode,
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    require_small_fixtures()
    world = make_world(tmp_path / "certs")
    tls = OrthancTls(world.peer.certificate, world.peer.private_key, world.ca.certificate)
    server = orthanc_factory(tls=tls)
    node = indexed_node
    data = node.config.model_dump(mode="json")
    peer = {"ae_title": server.aet, "host": "127.0.0.1", "port": server.dicom_port}
    data["destinations"] = {
        "secure": {**peer, "tls": destination_tls_section(world)},
        "plain": peer,  # a destination someone forgot to switch to TLS
    }
    data["routing"] = {"send_to": ["secure", "plain"]}
    config = NodeConfig.model_validate(data)
    (job_id,) = make_jobs(node, 1)
    files = _derived(config, job_id, 3)
    assert jobs.claim_next(node.sessions, "w") == job_id
    assert jobs.enter_stage(node.sessions, job_id, "w", JobState.SENDING)

    states = dispatch.send_job(node.sessions, config, job_id, "w", files)

    assert states == {"secure": SendState.DONE, "plain": SendState.RETRY}
    assert len(server.instances()) == 3
    log_file, _key = config.audit.paths(config.storage.root)
    sent = [r for r in audit.read_log(log_file) if r["event"] == "instances-sent"]
    assert sorted(r["outcome"] for r in sent) == [0, 4]
    ok = next(r for r in sent if r["outcome"] == 0)
    dest = next(p for p in ok["participants"] if p["role"] == "destination")
    assert dest["tls_subject"] == world.peer.subject and dest["port"] == server.dicom_port
    first = pydicom.dcmread(files[0].path, stop_before_pixels=True)
    study = next(o for o in ok["objects"] if o["type"] == "study")
    assert study["id"] == first.StudyInstanceUID
    assert any(o["type"] == "patient" and o["id"].startswith("hmac-sha256:") for o in ok["objects"])
    text = log_file.read_text()
    assert str(first.PatientID) not in text and str(first.PatientName) not in text
    assert audit.verify_log(log_file).problems == []
