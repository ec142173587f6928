"""A PACS (real Orthanc) that knows the node, a node index with prefetch configured, and the
series variants prefetch must leave alone (another issuer, the node's own output, a CT)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from dicom_node.imaging.identity import MANUFACTURER
from dicom_node.models import Prefetch, PrefetchEvent
from dicom_node.net.scp import StorageSCP
from tests.peers import free_port
from tests.peers.node import NODE_AET
from tests.peers.orthanc import Orthanc, Peer
from tests.support.data import remap_uid
from tests.support.indexed import IndexedNode, make_indexed_node

PACS = "pacs"
"""The destinations entry that is the prefetch source in these tests."""


@dataclass
class PrefetchSetup:
    """A node index with prefetch from ``pacs`` configured, and that PACS."""

    node: IndexedNode
    pacs: Orthanc
    node_port: int


def pacs_knowing_node(orthanc_factory: Callable[..., Orthanc], node_port: int) -> Orthanc:
    """A started Orthanc that knows the node (AE, host, port) as a modality: it answers the
    node's C-FIND / C-GET and accepts it as a C-MOVE destination."""
    return orthanc_factory(modalities={NODE_AET: Peer(NODE_AET, "127.0.0.1", node_port)})


def pacs_destination(pacs: Orthanc) -> dict[str, Any]:
    """The PACS as a ``destinations`` entry."""
    return {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}


def prefetch_setup(
    root: Path,
    orthanc_factory: Callable[..., Orthanc],
    sections: dict[str, Any] | None = None,
    **prefetch: Any,
) -> PrefetchSetup:
    """A PACS knowing the node, and a node index whose ``prefetch`` uses it (keys of
    ``prefetch`` added; other config ``sections`` replace the fast test config's)."""
    root.mkdir(parents=True, exist_ok=True)
    node_port = free_port()
    pacs = pacs_knowing_node(orthanc_factory, node_port)
    node = make_indexed_node(
        root,
        node={"port": node_port},
        destinations={PACS: pacs_destination(pacs)},
        prefetch={"enabled": True, "source": PACS, "method": "move", **prefetch},
        **(sections or {}),
    )
    return PrefetchSetup(node, pacs, node_port)


@contextmanager
def listening(node: IndexedNode) -> Iterator[StorageSCP]:
    """The node's real Storage SCP on its configured port (C-MOVE destination)."""
    scp = StorageSCP(node.config, node.store)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(graceful=False)


def rewritten(src: Path, dst: Path, salt: str, **attributes: Any) -> Path:
    """Copy every file of ``src`` to ``dst`` as a new series (UIDs remapped under ``salt``),
    setting ``attributes`` (``StudyInstanceUID`` kept as given when set)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, kw, remap_uid(str(getattr(ds, kw)), salt))
        for kw, value in attributes.items():
            setattr(ds, kw, value)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def own_derived_copy(src: Path, dst: Path, study_uid: str) -> Path:
    """An MR series as the node derives it (ImageType DERIVED, the node's Manufacturer) in the
    CT's study, as it would come back from the PACS."""
    return rewritten(
        src,
        dst,
        "own-derived",
        StudyInstanceUID=study_uid,
        ImageType=["DERIVED", "SECONDARY"],
        Manufacturer=MANUFACTURER,
        SeriesDescription="T2 registered to CT",
    )


def first_uid(folder: Path, keyword: str) -> str:
    """A UID attribute of the first file of a series folder."""
    first = sorted(folder.glob("*.dcm"))[0]
    return str(getattr(pydicom.dcmread(first, stop_before_pixels=True), keyword))


def prefetches(node: IndexedNode) -> list[Prefetch]:
    """Every prefetch of the index, oldest first, with events and retrievals loaded."""
    with node.sessions() as s:
        rows = list(s.scalars(select(Prefetch).order_by(Prefetch.id)).all())
        for row in rows:
            _ = (row.events, row.retrievals)
        return rows


def events_text(node: IndexedNode) -> list[str]:
    """Every recorded prefetch step as ``kind: detail``."""
    with node.sessions() as s:
        return [
            f"{e.kind}: {e.detail}"
            for e in s.scalars(select(PrefetchEvent).order_by(PrefetchEvent.id))
        ]
