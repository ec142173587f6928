"""Completion: quiet periods, revisions on changed content, identical re-sends."""

from __future__ import annotations

from pathlib import Path

import pydicom

from dicom_node.models import SeriesProgress
from dicom_node.orchestration import pairing
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.indexed import IndexedNode
from tests.support.jobs import all_jobs
from tests.support.time import LATER, later


def test_resend_identical_is_noop_changed_series_reprocessed(
    indexed_node: IndexedNode, tmp_path: Path
) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(SMALL_CT)
    node.ingest(SMALL_MR)
    assert len(pairing.scan(node.sessions, node.config, now=later()).jobs) == 1
    node.ingest(SMALL_CT)  # identical re-send
    assert pairing.scan(node.sessions, node.config, now=later() + LATER).jobs == []
    # one more CT instance (new SOP UID, same series): the CT changed -> new job, new revision
    first = sorted(SMALL_CT.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [-999.0]
    extra = tmp_path / "extra"
    extra.mkdir()
    ds.save_as(extra / "x.dcm", enforce_file_format=True)
    node.ingest(extra)
    result = pairing.scan(node.sessions, node.config, now=later() + 2 * LATER)
    assert len(result.jobs) == 1
    first_job, second_job = all_jobs(node)
    assert (first_job.ct_revision, second_job.ct_revision) == (1, 2)
    assert (first_job.revision, second_job.revision) == (0, 1)
    with node.sessions() as s:
        prog = s.get(SeriesProgress, second_job.ct_series_uid)
        assert prog is not None and prog.instance_count == 70
