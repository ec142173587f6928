"""Prefetch's query side: the same-patient rule on C-FIND answers, and ranking with pairing's
rules (no network here; the queries against a real PACS are in test_prefetch.py)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from dicom_node.errors import UsageError
from dicom_node.imaging.identity import MANUFACTURER
from dicom_node.orchestration import pairing
from dicom_node.orchestration.prefetch_query import (
    Candidate,
    _candidate,
    _study_mismatch,
    _window,
    rank,
    reference_ct,
)
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.indexed import IndexedNode, make_indexed_node
from tests.support.prefetch import first_uid
from tests.support.time import later

CT = pairing.SeriesInfo(
    series_uid="1.1",
    study_uid="1",
    patient_id="P1",
    issuer="",
    modality="CT",
    description="CT",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation=(1, 0, 0, 0, 1, 0),
    num_instances=60,
    acquired_at=datetime(2020, 3, 1),
    revision=1,
)


def _study(**kw: str) -> dict[str, str]:
    base = {
        "StudyInstanceUID": "2.1",
        "StudyDate": "20200201",
        "StudyTime": "",
        "PatientID": "P1",
        "IssuerOfPatientID": "",
    }
    return base | kw


def _series(uid: str, **kw: str) -> dict[str, str]:
    base = {
        "SeriesInstanceUID": uid,
        "Modality": "MR",
        "SeriesDescription": "T2",
        "SeriesDate": "20200201",
        "SeriesTime": "101500",
        "SeriesNumber": "3",
        "NumberOfSeriesRelatedInstances": "40",
        "ImageType": "ORIGINAL\\PRIMARY",
        "Manufacturer": "ACME",
    }
    return base | kw


def _cand(uid: str, study: dict[str, str] | None = None, **kw: str) -> Candidate:
    return _candidate(study or _study(), _series(uid, **kw))


def test_window_and_same_patient_rule() -> None:
    assert _window(CT, 30) == "20200131-20200331"
    assert _study_mismatch(_study(), CT) is None
    assert "another patient" in (_study_mismatch(_study(IssuerOfPatientID="X"), CT) or "")
    assert "PatientID differs" in (_study_mismatch(_study(PatientID="P1*"), CT) or "")
    assert "StudyInstanceUID" in (_study_mismatch(_study(StudyInstanceUID="../x"), CT) or "")


def test_candidate_from_a_series_match() -> None:
    cand = _cand("2.1.1")
    assert cand.expected == 40 and cand.info.num_instances == 40
    assert cand.info.acquired_at == datetime(2020, 2, 1, 10, 15)
    assert cand.info.image_type == ("ORIGINAL", "PRIMARY")
    unknown = _cand("2.1.2", NumberOfSeriesRelatedInstances="", SeriesDate="")
    assert unknown.expected == 0 and unknown.info.num_instances == pairing.MIN_MR_SLICES
    assert unknown.info.acquired_at == datetime(2020, 2, 1)  # the study date


def _node(tmp_path: Path, **sections: object) -> IndexedNode:
    return make_indexed_node(tmp_path, **sections)


def test_rank_excludes_own_derived_tiny_and_far_series(tmp_path: Path) -> None:
    node = _node(tmp_path, derive={"uid_root": "1.2.826.0.1.9999"})
    try:
        candidates = [
            _cand("2.1.1", SeriesDescription="T2 near"),
            _cand("2.1.2", Manufacturer=MANUFACTURER, SeriesDescription="fused"),
            _cand("1.2.826.0.1.9999.5", Manufacturer="", SeriesDescription="reg MR"),
            _cand("2.1.4", ImageType="DERIVED\\SECONDARY"),
            _cand("2.1.5", NumberOfSeriesRelatedInstances="2"),
            _cand("2.1.6", SeriesDate="20190101"),
            _cand("2.1.7", SeriesDescription="T1 post", SeriesDate="20200110"),
        ]
        with node.sessions() as s:
            chosen, rejected = rank(s, node.config, CT, candidates)
    finally:
        node.close()
    assert [c.info.series_uid for c, _ in chosen] == ["2.1.1"]  # max_series 1: the closest
    assert "own derived series (Manufacturer" in rejected["2.1.2"]
    assert "derive.uid_root" in rejected["1.2.826.0.1.9999.5"]
    assert "DERIVED" in rejected["2.1.4"]
    assert "not a volume" in rejected["2.1.5"]
    assert "pairing.max_days_between" in rejected["2.1.6"]
    assert "2.1.7" not in rejected  # usable, ranked lower


def test_rank_uses_pairing_rules_for_several_series(tmp_path: Path) -> None:
    rules = [{"series_description_regex": "(?i)t1.*post", "weight": 2}]
    node = _node(
        tmp_path,
        pairing={"series_quiet_seconds": 1.0, "mr_rules": rules},
        prefetch={"max_series": 2},
    )
    try:
        candidates = [
            _cand("2.1.1", SeriesDescription="T2 near"),
            _cand("2.1.7", SeriesDescription="T1 post", SeriesDate="20200110"),
            _cand("2.1.8", SeriesDescription="flair", SeriesDate="20200105"),
        ]
        with node.sessions() as s:
            chosen, _ = rank(s, node.config, CT, candidates)
    finally:
        node.close()
    assert [c.info.series_uid for c, _ in chosen] == ["2.1.7", "2.1.1"]
    assert "weight 2" in chosen[0][1]


def test_rank_skips_a_series_already_stored_whole(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    n = indexed_node.ingest(SMALL_MR)
    uid = first_uid(SMALL_MR, "SeriesInstanceUID")
    ct = pairing.SeriesInfo(**{**CT.__dict__, "acquired_at": datetime(1990, 2, 2)})
    study = _study(StudyDate="19900101")
    whole = _cand(uid, study, NumberOfSeriesRelatedInstances=str(n), SeriesDate="19900101")
    more = _cand(uid, study, NumberOfSeriesRelatedInstances=str(n + 5), SeriesDate="19900101")
    with indexed_node.sessions() as s:
        _, rejected = rank(s, indexed_node.config, ct, [whole])
        chosen, _ = rank(s, indexed_node.config, ct, [more])
    assert rejected[uid] == f"already stored ({n} instances)"
    assert [c.info.series_uid for c, _ in chosen] == [uid]  # stored in part: fetch the rest


def test_reference_ct_is_the_newest_eligible_ct(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    patient = "MRI-DIR-zzmeatphantom"
    with indexed_node.sessions() as s, pytest.raises(UsageError, match="no patient"):
        reference_ct(s, indexed_node.config, patient, None)
    indexed_node.ingest(SMALL_MR)
    with indexed_node.sessions() as s, pytest.raises(UsageError, match="no complete, eligible CT"):
        reference_ct(s, indexed_node.config, patient, None)
    indexed_node.ingest(SMALL_CT)
    pairing.scan(indexed_node.sessions, indexed_node.config, now=later())
    with indexed_node.sessions() as s:
        ct = reference_ct(s, indexed_node.config, patient, None)
    assert ct.series_uid == first_uid(SMALL_CT, "SeriesInstanceUID")
