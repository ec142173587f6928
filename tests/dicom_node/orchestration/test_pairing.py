"""Pairing: the pure rules, and the decisions they make on a real index."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from sqlalchemy import select

from dicom_node.models import PairingDecision
from dicom_node.orchestration import pairing
from dicom_node.states import JobState, PairingOutcome
from tests.support.data import SMALL_CT, SMALL_MR, copy_series, require_small_fixtures
from tests.support.indexed import IndexedNode
from tests.support.jobs import all_jobs
from tests.support.time import LATER, later


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


def test_quiet_period_pairing_and_waiting(indexed_node: IndexedNode, tmp_path: Path) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(SMALL_CT, aet="CTSCANNER")
    # not quiet yet: nothing happens
    assert pairing.scan(node.sessions, node.config).completed == []
    result = pairing.scan(node.sessions, node.config, now=later())
    assert len(result.completed) == 1 and result.waiting and not result.jobs
    # a second patient's MR must not be paired with this CT
    other_mr = copy_series(SMALL_MR, tmp_path / "other_mr", salt="p2", patient_id="OTHER-2")
    node.ingest(other_mr, aet="MRSCANNER")
    result = pairing.scan(node.sessions, node.config, now=later())
    assert not result.jobs
    # the MR of the same patient arrives after the CT and triggers the pairing
    node.ingest(SMALL_MR, aet="MRSCANNER")
    result = pairing.scan(node.sessions, node.config, now=later() + LATER)
    assert len(result.jobs) == 1
    (job,) = all_jobs(node)
    assert job.state == JobState.QUEUED and job.revision == 0
    assert "32.0 days before the CT" in job.pairing_reason
    with node.sessions() as s:
        outcomes = [d.outcome for d in s.scalars(select(PairingDecision)).all()]
    assert outcomes[0] == PairingOutcome.WAITING and outcomes[-1] == PairingOutcome.PAIRED
    # scanning again changes nothing
    assert pairing.scan(node.sessions, node.config, now=later() + 2 * LATER).jobs == []
    assert len(all_jobs(node)) == 1


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
    node.ingest(SMALL_CT, aet="SLOWPACS")
    assert pairing.scan(node.sessions, cfg, now=later()).completed == []
    node.ingest(copy_series(SMALL_CT, tmp_path / "ct2", salt="x"), aet="FAST")
    result = pairing.scan(node.sessions, cfg, now=later())
    assert len(result.completed) == 1 and not result.jobs
    with node.sessions() as s:
        d = s.scalars(select(PairingDecision)).one()
    assert d.outcome == PairingOutcome.IGNORED and "min_slices" in d.reason


def test_waiting_ct_expires(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    node = indexed_node
    node.ingest(SMALL_CT)
    pairing.scan(node.sessions, node.config, now=later())
    with node.sessions() as s:
        assert len(pairing.waiting_cts(s)) == 1
    result = pairing.scan(node.sessions, node.config, now=later() + timedelta(days=91))
    assert len(result.expired) == 1
    with node.sessions() as s:
        assert pairing.waiting_cts(s) == []


def test_changed_mr_repairs_its_ct(indexed_node: IndexedNode, tmp_path: Path) -> None:
    """An instance added to the MR after its job: the CT is paired again with the new MR
    revision (new job, new output revision)."""
    require_small_fixtures()
    node = indexed_node
    node.ingest(SMALL_CT)
    node.ingest(SMALL_MR)
    assert len(pairing.scan(node.sessions, node.config, now=later()).jobs) == 1
    ds = pydicom.dcmread(sorted(SMALL_MR.glob("*.dcm"))[0])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    extra = tmp_path / "mr_extra"
    extra.mkdir()
    ds.save_as(extra / "x.dcm", enforce_file_format=True)
    node.ingest(extra)
    assert len(pairing.scan(node.sessions, node.config, now=later() + LATER).jobs) == 1
    first, second = all_jobs(node)
    assert (first.mr_revision, second.mr_revision) == (1, 2)
    assert second.ct_series_uid == first.ct_series_uid and second.revision == 1
