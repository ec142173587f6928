"""dicom_node.net.scu against real peers: Orthanc, DCMTK storescp, and small pynetdicom SCPs."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, JPEGLSLossless, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.errors import NetworkError, SendError
from dicom_node.net.scu import SendOptions, SendResult, echo, send_datasets, send_files
from tests.peers import (
    FIXTURES,
    MRIDIR,
    dcmtk,
    free_port,
    port_open,
    require_full_data,
    wait_until,
)
from tests.peers.orthanc import Orthanc, Peer

pytestmark = pytest.mark.peers

CT_DIR = FIXTURES / "mridir_small" / "ct"
MR_DIR = FIXTURES / "mridir_small" / "mr"
AET = "NODE_TEST"


def fixture_files(folder: Path, count: int | None = None) -> list[Path]:
    """Sorted .dcm files of a committed fixture series (fail loudly if missing)."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        pytest.fail(f"committed fixture series {folder} is missing")
    return files[:count] if count else files


def closed_port_peer() -> Peer:
    """A destination on a loopback port where nothing listens."""
    return Peer(ae_title="NOBODY", host="127.0.0.1", port=free_port())


def assert_same_pixels(source: pydicom.Dataset, received: pydicom.Dataset) -> None:
    """Decoded pixel arrays identical (works whatever the transfer syntaxes)."""
    assert received.SOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(received.pixel_array, source.pixel_array)


# --------------------------------------------------------------------------- echo
def test_echo_orthanc(orthanc: Orthanc) -> None:
    echo(orthanc.destination, calling_aet=AET)


def test_echo_closed_port_raises_network_error() -> None:
    with pytest.raises(NetworkError, match=r"echo NOBODY@127\.0\.0\.1"):
        echo(closed_port_peer(), calling_aet=AET, timeout=5)


# --------------------------------------------------------------------------- Orthanc
def test_send_series_to_orthanc_identical_pixels(orthanc: Orthanc) -> None:
    files = fixture_files(CT_DIR)
    result = send_files(orthanc.destination, files, options=SendOptions(AET))

    assert isinstance(result, SendResult)
    assert (result.sent, result.failed, result.attempts) == (len(files), 0, 1)
    assert result.bytes_sent > sum(f.stat().st_size for f in files) * 0.9
    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    assert sorted(result.sop_instance_uids) == sorted(sources)
    received = orthanc.datasets_by_sop_uid()
    assert set(received) == set(sources)
    for uid, ds in received.items():
        src = sources[uid]
        # Same transfer syntax as stored, so the PixelData bytes themselves must match.
        assert ds.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert ds.PixelData == src.PixelData
        assert_same_pixels(src, ds)


def test_one_association_per_series(orthanc: Orthanc) -> None:
    ct, mr = fixture_files(CT_DIR, 5), fixture_files(MR_DIR, 4)
    result = send_files(orthanc.destination, [*mr[:2], *ct, *mr[2:]], options=SendOptions(AET))
    assert (result.sent, result.attempts) == (9, 2)
    assert len(orthanc.series()) == 2
    assert orthanc.sop_instance_uids() == set(result.sop_instance_uids)


def test_send_datasets_in_memory(orthanc: Orthanc) -> None:
    series_uid = generate_uid()
    datasets = []
    for path in fixture_files(CT_DIR, 3):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    bare = pydicom.dcmread(fixture_files(CT_DIR)[3])
    bare.SeriesInstanceUID, bare.SOPInstanceUID = series_uid, generate_uid()
    del bare.file_meta  # no file meta at all: sent as Explicit VR Little Endian
    datasets.append(bare)

    result = send_datasets(orthanc.destination, datasets, options=SendOptions(AET))
    assert result.sent == 4
    assert not hasattr(bare, "file_meta")  # the caller's dataset is left alone
    received = orthanc.datasets_by_sop_uid()
    for ds in datasets:
        assert received[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def test_peer_failure_status_is_partial_send(orthanc: Orthanc, tmp_path: Path) -> None:
    """Orthanc refuses an instance without StudyInstanceUID with 0xA700: a partial send."""
    good = fixture_files(CT_DIR, 3)
    bad = pydicom.dcmread(fixture_files(CT_DIR)[3])
    del bad.StudyInstanceUID
    bad.save_as(tmp_path / "no-study.dcm")

    with pytest.raises(SendError) as info:
        send_files(
            orthanc.destination,
            [good[0], tmp_path / "no-study.dcm", *good[1:]],
            options=SendOptions(AET, retries=2, backoff_seconds=0.05),
        )
    err = info.value
    assert err.sent == 3
    assert err.failed == {str(bad.SOPInstanceUID): "status 0xA700"}
    assert err.attempts == 3  # 0xA7xx (out of resources) is worth retrying
    assert err.exit_code == NetworkError.exit_code
    assert len(orthanc.instances()) == 3


def test_sop_class_refused_at_negotiation_is_partial_send(orthanc: Orthanc, tmp_path: Path) -> None:
    """An instance whose SOP class Orthanc does not accept fails at once, the rest arrive."""
    files = fixture_files(CT_DIR, 2)
    odd = pydicom.dcmread(fixture_files(CT_DIR)[2])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = UID("1.2.826.0.1.3680043.9.9999.1")
    odd.save_as(tmp_path / "odd.dcm")
    unreadable = tmp_path / "not-dicom.dcm"
    unreadable.write_bytes(b"not a DICOM file")

    with pytest.raises(SendError) as info:
        send_files(
            orthanc.destination,
            [*files, tmp_path / "odd.dcm", unreadable],
            options=SendOptions(AET),
        )
    err = info.value
    assert err.sent == 2
    assert err.attempts == 1  # neither failure can be fixed by retrying
    assert "not accepted by the peer" in err.failed[str(odd.SOPInstanceUID)]
    assert err.failed[str(unreadable)].startswith("unreadable")
    assert len(orthanc.instances()) == 2


def test_down_destination_bounded_retries() -> None:
    start = time.monotonic()
    with pytest.raises(SendError) as info:
        send_files(
            closed_port_peer(),
            fixture_files(CT_DIR, 3),
            options=SendOptions(AET, retries=2, backoff_seconds=0.1, timeout=5),
        )
    elapsed = time.monotonic() - start
    assert info.value.attempts == 3
    assert all(r.startswith("cannot connect to 127.0.0.1:") for r in info.value.failed.values())
    assert info.value.sent == 0 and len(info.value.failed) == 3
    assert elapsed >= 0.3  # it waited the backoff (0.1 + 0.2 s) before giving up


def test_permanent_association_rejection_not_retried(
    orthanc_factory: Callable[..., Orthanc],
) -> None:
    """Orthanc checking the called AE title rejects a wrong one permanently: no retries."""
    orthanc = orthanc_factory(config={"DicomCheckCalledAet": True})
    wrong = Peer("NOT_ORTHANC", "127.0.0.1", orthanc.dicom_port)
    with pytest.raises(NetworkError, match="rejected"):
        echo(wrong, calling_aet=AET)
    with pytest.raises(SendError) as info:
        send_files(wrong, fixture_files(CT_DIR, 2), options=SendOptions(AET, backoff_seconds=5))
    assert info.value.attempts == 1
    assert all("rejected (permanent" in r for r in info.value.failed.values())
    assert orthanc.instances() == []


def test_destination_back_during_backoff(orthanc: Orthanc) -> None:
    """Orthanc is down when the send starts and up again before the retries run out."""
    orthanc.stop(graceful=False)  # as after a crash; it comes back on the same port
    restarter = threading.Timer(0.2, orthanc.start)
    restarter.start()
    try:
        result = send_files(
            orthanc.destination,
            fixture_files(CT_DIR, 4),
            options=SendOptions(AET, retries=6, backoff_seconds=0.25),
        )
    finally:
        restarter.join()
    assert result.sent == 4 and result.attempts >= 2
    assert len(orthanc.instances()) == 4


# --------------------------------------------------------------------------- compression
@pytest.fixture
def jpegls_files(tmp_path: Path) -> list[Path]:
    """Three fixture CT slices re-encoded JPEG-LS lossless with DCMTK dcmcjpls."""
    out = []
    for src in fixture_files(CT_DIR, 3):
        dst = tmp_path / "jls" / src.name
        dst.parent.mkdir(exist_ok=True)
        subprocess.run([dcmtk("dcmcjpls"), str(src), str(dst)], check=True, timeout=60)
        assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == JPEGLSLossless
        out.append(dst)
    return out


@pytest.fixture
def dcmtk_storescp(tmp_path: Path) -> Iterator[tuple[Peer, Path]]:
    """DCMTK storescp accepting only Implicit VR Little Endian, storing into a temp folder."""
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    log = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen(
        [dcmtk("storescp"), "--implicit", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        wait_until(lambda: proc.poll() is None and port_open(port), 20, what="storescp")
        yield Peer("STORESCP", "127.0.0.1", port), out
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_compressed_to_uncompressed_only_peer_is_decompressed(
    jpegls_files: list[Path], dcmtk_storescp: tuple[Peer, Path]
) -> None:
    peer, out = dcmtk_storescp
    result = send_files(peer, jpegls_files, options=SendOptions(AET))
    assert result.sent == 3
    received = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, out.iterdir())}
    assert len(received) == 3
    for src in map(pydicom.dcmread, jpegls_files):
        got = received[str(src.SOPInstanceUID)]
        assert not got.file_meta.TransferSyntaxUID.is_compressed
        assert_same_pixels(src, got)


def test_compressed_kept_when_peer_accepts_it(orthanc: Orthanc, jpegls_files: list[Path]) -> None:
    result = send_files(orthanc.destination, jpegls_files, options=SendOptions(AET))
    assert result.sent == 3
    received = orthanc.datasets_by_sop_uid()
    for src in map(pydicom.dcmread, jpegls_files):
        got = received[str(src.SOPInstanceUID)]
        assert got.file_meta.TransferSyntaxUID == JPEGLSLossless  # not transcoded on the way
        oid = orthanc.find_instance(str(src.SOPInstanceUID))
        assert oid is not None
        frame = pydicom.encaps.generate_frames(src.PixelData, number_of_frames=1)
        assert orthanc.raw_frame(oid) == next(frame)
        assert_same_pixels(src, got)


def test_compressed_to_orthanc_restricted_to_uncompressed(
    orthanc_factory: Callable[..., Orthanc], jpegls_files: list[Path]
) -> None:
    orthanc = orthanc_factory(
        config={"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]}
    )
    result = send_files(orthanc.destination, jpegls_files, options=SendOptions(AET))
    assert result.sent == 3
    received = orthanc.datasets_by_sop_uid()
    for src in map(pydicom.dcmread, jpegls_files):
        got = received[str(src.SOPInstanceUID)]
        assert not got.file_meta.TransferSyntaxUID.is_compressed
        assert_same_pixels(src, got)


# --------------------------------------------------------------------------- status handling
class ScriptedSCP:
    """A pynetdicom storage SCP answering C-STOREs from a status script (test double peer)."""

    def __init__(self, statuses: Callable[[str, int], int]) -> None:
        self.statuses = statuses
        self.received: list[str] = []
        self.associations = 0
        self.port = free_port()
        ae = AE(ae_title="SCRIPTED")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accept),
        ]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server
        self.peer = Peer("SCRIPTED", "127.0.0.1", self.port)

    def _on_accept(self, event: evt.Event) -> None:
        self.associations += 1

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        self.received.append(uid)
        return self.statuses(uid, self.received.count(uid))


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[str, int], int]], ScriptedSCP]]:
    servers: list[ScriptedSCP] = []

    def make(statuses: Callable[[str, int], int]) -> ScriptedSCP:
        servers.append(ScriptedSCP(statuses))
        return servers[-1]

    yield make
    for s in servers:
        s.server.shutdown()


def uids_of(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def test_retry_resends_only_unacknowledged(
    scripted: Callable[[Callable[[str, int], int]], ScriptedSCP],
) -> None:
    files = fixture_files(CT_DIR, 5)
    uids = uids_of(files)
    flaky = {uids[1], uids[3]}
    scp = scripted(lambda uid, n: 0xA700 if uid in flaky and n < 3 else 0x0000)

    result = send_files(scp.peer, files, options=SendOptions(AET, retries=3, backoff_seconds=0.01))
    assert result.sent == 5 and result.attempts == 3
    assert scp.associations == 3
    assert sorted(scp.received) == sorted(uids + 2 * sorted(flaky))
    assert result.sop_instance_uids == [uids[0], uids[2], uids[4], uids[1], uids[3]]


def test_warning_statuses_count_as_success(
    scripted: Callable[[Callable[[str, int], int]], ScriptedSCP],
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = fixture_files(CT_DIR, 4)
    uids = uids_of(files)
    warnings = {uids[0]: 0xB000, uids[1]: 0xB006, uids[2]: 0xB007}
    scp = scripted(lambda uid, n: warnings.get(uid, 0x0000))
    result = send_files(scp.peer, files, options=SendOptions(AET))
    assert result.sent == 4 and result.warnings == warnings
    assert "warning 0xB006" in caplog.text


def test_permanent_failure_not_retried_and_other_warning_is_failure(
    scripted: Callable[[Callable[[str, int], int]], ScriptedSCP],
) -> None:
    files = fixture_files(CT_DIR, 4)
    uids = uids_of(files)
    script = {uids[1]: 0xC123, uids[2]: 0x0107}  # cannot understand; non-store warning
    scp = scripted(lambda uid, n: script.get(uid, 0x0000))
    with pytest.raises(SendError) as info:
        send_files(scp.peer, files, options=SendOptions(AET, retries=2, backoff_seconds=0.01))
    assert info.value.failed == {uids[1]: "status 0xC123", uids[2]: "status 0x0107"}
    assert info.value.sent == 2
    # 0xC123 is given up at once; 0x0107 is retried until the retries run out.
    assert scp.received.count(uids[1]) == 1 and scp.received.count(uids[2]) == 3


def test_summary_log_has_no_patient_identifiers(
    orthanc: Orthanc, caplog: pytest.LogCaptureFixture
) -> None:
    files = fixture_files(CT_DIR, 2)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    with caplog.at_level("INFO", logger="dicom_node.net.scu"):
        send_files(orthanc.destination, files, options=SendOptions(AET))
    infos = [r.getMessage() for r in caplog.records if r.name == "dicom_node.net.scu"]
    summary = [m for m in infos if m.startswith("send to ORTHANC@127.0.0.1")]
    assert summary and "2/2 instances" in summary[0] and "bytes" in summary[0]
    assert summary[0].endswith(" ok")
    for msg in infos:
        assert str(ds.PatientID) not in msg and str(ds.PatientName) not in msg


@pytest.mark.slow
@pytest.mark.fulldata
def test_full_mridir_ct_to_orthanc(orthanc: Orthanc) -> None:
    """The whole 205-slice MRI-DIR CT arrives with byte-identical PixelData."""
    files = sorted(require_full_data(MRIDIR / "ct").glob("*.dcm"))
    result = send_files(orthanc.destination, files, options=SendOptions(AET))
    assert result.sent == len(files) == 205
    sources = {str(ds.SOPInstanceUID): ds.PixelData for ds in (pydicom.dcmread(f) for f in files)}
    received = orthanc.datasets_by_sop_uid()
    assert set(received) == set(sources)
    assert all(received[uid].PixelData == pixels for uid, pixels in sources.items())
