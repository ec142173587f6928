"""dicom_node.net.qr against a real Orthanc: C-FIND, C-MOVE to the node's real SCP, C-GET."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.errors import QueryRetrieveError
from dicom_node.net import qr
from dicom_node.orchestration.prefetch import MR_STORAGE_SOP_CLASSES
from dicom_node.orchestration.retrieval_hold import stored_count
from tests.peers import free_port
from tests.peers.node import NODE_AET
from tests.peers.orthanc import Orthanc, Peer
from tests.support.data import SMALL_CT, SMALL_MR, encode, require_small_fixtures
from tests.support.prefetch import PrefetchSetup, first_uid, listening, prefetch_setup

pytestmark = pytest.mark.peers

OPTIONS = qr.QROptions(calling_aet=NODE_AET, timeout=20)


@pytest.fixture
def setup(tmp_path: Path, orthanc_factory: Callable[..., Orthanc]) -> Iterator[PrefetchSetup]:
    """A node index and an Orthanc that knows it, holding the small MR and CT."""
    require_small_fixtures()
    made = prefetch_setup(tmp_path, orthanc_factory)
    made.pacs.upload_folder(SMALL_MR)
    made.pacs.upload_folder(SMALL_CT)
    yield made
    made.node.close()


def _study(folder: Path) -> str:
    return first_uid(folder, "StudyInstanceUID")


def _series(folder: Path) -> str:
    return first_uid(folder, "SeriesInstanceUID")


def test_find_studies_and_series(setup: PrefetchSetup) -> None:
    patient = str(pydicom.dcmread(sorted(SMALL_MR.glob("*.dcm"))[0]).PatientID)
    with qr.QueryAssociation(setup.pacs.destination, OPTIONS) as qa:
        studies = qa.find(
            "STUDY",
            {"PatientID": patient, "ModalitiesInStudy": "MR", "StudyInstanceUID": ""},
        )
        assert [s["StudyInstanceUID"] for s in studies] == [_study(SMALL_MR)]
        series = qa.find(
            "SERIES",
            {
                "StudyInstanceUID": studies[0]["StudyInstanceUID"],
                "Modality": "",
                "SeriesInstanceUID": "",
                "NumberOfSeriesRelatedInstances": "",
                "ImageType": "",
            },
        )
        assert studies[0]["PatientID"] == patient
    assert len(series) == 1
    assert series[0]["Modality"] == "MR"
    assert series[0]["NumberOfSeriesRelatedInstances"] == str(len(list(SMALL_MR.glob("*.dcm"))))
    assert series[0]["ImageType"].startswith("ORIGINAL\\PRIMARY")


def test_find_on_a_closed_port_is_a_query_retrieve_error() -> None:
    nobody = Peer("NOBODY", "127.0.0.1", free_port())
    with pytest.raises(QueryRetrieveError, match="cannot connect"):
        qr.QueryAssociation(nobody, qr.QROptions(calling_aet=NODE_AET, timeout=3))


def test_move_to_the_node_scp_is_complete(setup: PrefetchSetup) -> None:
    n = len(list(SMALL_MR.glob("*.dcm")))
    with listening(setup.node):
        result = qr.move_series(
            setup.pacs.destination,
            destination_aet=NODE_AET,
            options=OPTIONS,
            study_uid=_study(SMALL_MR),
            series_uid=_series(SMALL_MR),
        )
    assert result.complete, result.describe()
    assert (result.completed, result.failed, result.warning) == (n, 0, 0)
    with setup.node.sessions() as s:
        assert stored_count(s, _series(SMALL_MR)) == n


def test_move_to_an_unknown_destination_is_not_complete(setup: PrefetchSetup) -> None:
    result = qr.move_series(
        setup.pacs.destination,
        destination_aet="NOT_KNOWN",
        options=OPTIONS,
        study_uid=_study(SMALL_MR),
        series_uid=_series(SMALL_MR),
    )
    assert not result.complete
    # Orthanc answers 0xC000 ("unable to process"), others 0xA801 (destination unknown)
    assert result.status is not None and result.status >= 0xA000, result.describe()
    assert "unable to process" in result.describe() or "destination" in result.describe()
    assert result.completed == 0


def test_get_stores_through_the_node_store(setup: PrefetchSetup) -> None:
    n = len(list(SMALL_MR.glob("*.dcm")))
    result = qr.get_series(
        setup.pacs.destination,
        store=setup.node.store,
        sop_classes=MR_STORAGE_SOP_CLASSES,
        options=OPTIONS,
        study_uid=_study(SMALL_MR),
        series_uid=_series(SMALL_MR),
    )
    assert result.complete, result.describe()
    assert result.stored == n and result.completed == n
    with setup.node.sessions() as s:
        assert stored_count(s, _series(SMALL_MR)) == n


def test_get_offers_storage_only_for_the_classes_asked(setup: PrefetchSetup) -> None:
    """A C-GET for MR classes cannot bring a CT back: its sub-operations fail (Orthanc stops
    at the first), nothing is stored."""
    result = qr.get_series(
        setup.pacs.destination,
        store=setup.node.store,
        sop_classes=MR_STORAGE_SOP_CLASSES,
        options=OPTIONS,
        study_uid=_study(SMALL_CT),
        series_uid=_series(SMALL_CT),
    )
    assert not result.complete
    assert result.stored == 0 and result.completed == 0
    assert result.failed >= 1, result.describe()
    with setup.node.sessions() as s:
        assert stored_count(s, _series(SMALL_CT)) == 0


def test_get_with_a_refused_instance_is_partial(setup: PrefetchSetup) -> None:
    """An instance the store refuses (same SOPInstanceUID, other content already stored) is a
    failed sub-operation: the retrieval is partial, with the reason."""
    first = sorted(SMALL_MR.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "tampered"
    setup.node.store.store_encoded(encode(ds), calling_aet="OTHER", peer="test")
    result = qr.get_series(
        setup.pacs.destination,
        store=setup.node.store,
        sop_classes=MR_STORAGE_SOP_CLASSES,
        options=OPTIONS,
        study_uid=_study(SMALL_MR),
        series_uid=_series(SMALL_MR),
    )
    assert not result.complete
    assert result.failed == 1 and len(result.store_failures) == 1
    assert str(ds.SOPInstanceUID) in result.store_failures
    assert "refused by the node" in result.describe()
