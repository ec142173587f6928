"""Received datasets stream into the staging folder and are swept when a transfer dies."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.net.receive import ERROR_COMMENT_LENGTH, failure, sweep_staging
from dicom_node.storage.header import dataset_offset
from tests.peers import wait_until
from tests.peers.node import NodeProcess as Node
from tests.peers.raw_dicom import EXPLICIT_LE, P_DATA_TF, RawAssociation, c_store_rq, pdu

pytestmark = pytest.mark.peers


def copy_with_new_uid(src: Path, dst: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return ds


def _pdv(data: bytes, *, last: bool) -> bytes:
    return pdu(P_DATA_TF, struct.pack(">LBB", len(data) + 2, 1, 2 if last else 0) + data)


def test_received_data_streams_into_the_staging_folder(
    shared_node: Node, ct_files: list[Path], tmp_path: Path
) -> None:
    """pynetdicom writes the dataset to a file in storage.root/.incoming as it arrives (bounded
    memory, renamed into place on the same disk); the staging folder is empty afterwards."""
    ds = copy_with_new_uid(ct_files[63], tmp_path / "s.dcm")
    raw = (tmp_path / "s.dcm").read_bytes()
    data = raw[dataset_offset(raw) :]
    staging = shared_node.storage / ".incoming"
    with RawAssociation(shared_node.port) as a:
        assert a.associate([(1, str(ds.SOPClassUID), [EXPLICIT_LE])]).accepted
        request = c_store_rq(1, str(ds.SOPClassUID).encode(), ds.SOPInstanceUID.encode())
        a.p_data(1, request, command=True)
        head, last = data[:-2000], data[-2000:]
        for i in range(0, len(head), 8000):
            a.send(_pdv(head[i : i + 8000], last=False))
        partial = wait_until(lambda: list(staging.glob("tmp*.dcm")), timeout=10, what="file")
        assert partial[0].stat().st_size > 1000
        assert partial[0].stat().st_mode & 0o077 == 0
        a.send(_pdv(last, last=True))
        response = a.response()
        assert response is not None and response.status == 0
        assert a.release()
    stored = shared_node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID
    assert (stored / f"{ds.SOPInstanceUID}.dcm").read_bytes()[-2000:] == last
    assert not list(staging.iterdir())


def test_sweep_removes_only_idle_partial_files(tmp_path: Path) -> None:
    old = tmp_path / "tmpold.dcm"
    fresh = tmp_path / "tmpfresh.dcm"
    mine = tmp_path / ".incoming.abc.tmp"  # the store's own staged files are not pynetdicom's
    for f in (old, fresh, mine):
        f.write_bytes(b"x")
    past = time.time() - 120
    os.utime(old, (past, past))
    os.utime(mine, (past, past))
    assert sweep_staging(tmp_path, idle_seconds=60) == 1
    assert not old.exists() and fresh.exists() and mine.exists()


def test_failure_status_carries_a_short_printable_comment() -> None:
    rsp = failure(0xC210, "invalid UID '1.2\n3' " + "x" * 100)
    assert rsp.Status == 0xC210
    assert len(rsp.ErrorComment) == ERROR_COMMENT_LENGTH
    assert "\n" not in rsp.ErrorComment and rsp.ErrorComment.startswith("invalid UID '1.2?3'")
