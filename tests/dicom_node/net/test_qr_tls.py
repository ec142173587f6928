"""Prefetch queries over DICOM TLS: a destination's ``tls`` section applies to C-FIND too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import Destination
from dicom_node.errors import QueryRetrieveError
from dicom_node.net import qr
from tests.peers import free_port
from tests.peers.certs import destination_tls_section, make_world
from tests.peers.node import NODE_AET
from tests.peers.orthanc import Orthanc, OrthancTls, Peer
from tests.support.data import SMALL_MR, require_small_fixtures

pytestmark = pytest.mark.peers


def test_find_over_tls(orthanc_factory: Callable[..., Orthanc], tmp_path: Path) -> None:
    require_small_fixtures()
    world = make_world(tmp_path / "certs")
    tls = OrthancTls(world.peer.certificate, world.peer.private_key, world.ca.certificate)
    node = Peer(NODE_AET, "127.0.0.1", free_port())
    pacs = orthanc_factory(tls=tls, modalities={NODE_AET: node})
    pacs.upload_folder(SMALL_MR)
    peer = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
    secure = Destination.model_validate({**peer, "tls": destination_tls_section(world)})
    patient = str(pydicom.dcmread(sorted(SMALL_MR.glob("*.dcm"))[0]).PatientID)
    options = qr.QROptions(calling_aet=NODE_AET, timeout=20)
    with qr.QueryAssociation(secure, options) as qa:
        studies = qa.find("STUDY", {"PatientID": patient, "StudyInstanceUID": ""})
    assert len(studies) == 1
    wrong = {**destination_tls_section(world), "ca_certificates": str(world.other_ca.certificate)}
    untrusted = Destination.model_validate({**peer, "tls": wrong})
    with pytest.raises(QueryRetrieveError, match="TLS: certificate verify failed"):
        qr.QueryAssociation(untrusted, options)
