"""The storage SCP against real DCMTK peers (echoscu, storescu) over loopback."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

from dicom_node.db import make_engine, session_factory
from dicom_node.models import Instance, Patient, Series
from dicom_node.storage.header import dataset_offset
from tests.peers import dcmtk, port_open, wait_until
from tests.peers.node import NODE_AET
from tests.peers.node import NodeProcess as Node

pytestmark = [
    pytest.mark.peers,
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning"),
]


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part-10 file after its file meta."""
    data = path.read_bytes()
    return data[dataset_offset(data) :]


def stored_path(node: Node, ds: pydicom.Dataset) -> Path:
    """Where the node stores the instance ``ds``."""
    folder: Path = node.storage / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    return folder / f"{ds.SOPInstanceUID}.dcm"


def query(node: Node, stmt: object) -> list[object]:
    """Run a select against the node's index and return all rows (first column)."""
    engine = make_engine(node.db_url)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(stmt))  # type: ignore[call-overload]
    finally:
        engine.dispose()


def copy_with(src: Path, dst: Path, **changes: object) -> pydicom.Dataset:
    """Copy a DICOM file, changing attributes (meta UIDs follow SOP UIDs)."""
    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(dst, enforce_file_format=True)
    return ds


def test_echo(shared_node: Node) -> None:
    result = shared_node.echoscu()
    assert result.returncode == 0, result.stdout + result.stderr


def dcmtk_normalised(files: list[Path], out_dir: Path) -> list[Path]:
    """Copies re-written by DCMTK's dcmconv, in the encoding DCMTK's storescu puts on the wire.

    storescu re-encodes what it reads (e.g. undefined-length sequences get explicit lengths), so
    byte identity between a sent file and the stored one is only defined for files DCMTK wrote.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for f in files:
        dst = out_dir / f.name
        subprocess.run([dcmtk("dcmconv"), str(f), str(dst)], check=True, capture_output=True)
        result.append(dst)
    return result


def test_store_series_bytes_and_index(
    shared_node: Node, ct_files: list[Path], tmp_path: Path
) -> None:
    files = dcmtk_normalised(ct_files[:5], tmp_path)
    result = shared_node.storescu(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out = stored_path(shared_node, ds)
        assert out.is_file()
        assert dataset_bytes(out) == dataset_bytes(f), "stored dataset was re-encoded"
        row = query(
            shared_node, select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
        )
        assert len(row) == 1
        inst = row[0]
        assert isinstance(inst, Instance)
        assert inst.path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert inst.size == out.stat().st_size
        assert inst.sha256 == hashlib.sha256(dataset_bytes(f)).hexdigest()
        assert inst.transfer_syntax_uid == str(ds.file_meta.TransferSyntaxUID)
        assert inst.instance_number == int(ds.InstanceNumber)
        assert inst.slice_position is not None
        assert inst.calling_aet == "MODALITY"
    series = query(
        shared_node, select(Series).where(Series.series_instance_uid == first.SeriesInstanceUID)
    )
    assert len(series) == 1
    s = series[0]
    assert isinstance(s, Series)
    assert s.modality == "CT"
    assert s.number_of_instances == len(files)
    assert s.frame_of_reference_uid == first.FrameOfReferenceUID
    assert s.sop_class_uid == first.SOPClassUID
    assert s.calling_aet == "MODALITY"
    assert s.state == "receiving"
    assert s.image_orientation_patient is not None
    assert len(s.image_orientation_patient.split("\\")) == 6
    assert s.image_type and "ORIGINAL" in s.image_type
    assert s.first_received_at <= s.last_received_at
    patients = query(shared_node, select(Patient).where(Patient.patient_id == first.PatientID))
    assert len(patients) == 1
    # one INFO line for the association, without patient identity
    wait_until(lambda: "5 instances stored" in shared_node.log(), timeout=10, what="assoc log")
    log = shared_node.log()
    assert str(first.PatientName) not in log
    assert str(first.PatientID) not in log


def test_resend_identical_is_noop(shared_node: Node, ct_files: list[Path]) -> None:
    f = ct_files[10]
    assert shared_node.storescu(f).returncode == 0
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    out = stored_path(shared_node, ds)
    before = out.stat()
    result = shared_node.storescu(f, calling="OTHERAE")
    assert result.returncode == 0, result.stdout + result.stderr
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    rows = query(
        shared_node, select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
    )
    assert len(rows) == 1
    wait_until(lambda: "(1 duplicates)" in shared_node.log(), timeout=10, what="dup log")


def test_conflicting_same_uid_refused(
    shared_node: Node, ct_files: list[Path], tmp_path: Path
) -> None:
    original = ct_files[11]
    assert shared_node.storescu(original).returncode == 0
    conflict = tmp_path / "conflict.dcm"
    ds = copy_with(original, conflict, InstanceNumber=9999)
    out = stored_path(shared_node, ds)
    first = out.read_bytes()
    result = shared_node.storescu(conflict)
    assert result.returncode != 0
    assert "Store Response (Error" in result.stdout + result.stderr
    assert out.read_bytes() == first, "the first instance must be kept"
    wait_until(lambda: "different content" in shared_node.log(), timeout=10, what="warning")


def test_malformed_datasets_refused_node_keeps_serving(
    shared_node: Node, ct_files: list[Path], tmp_path: Path
) -> None:
    bad_study = tmp_path / "bad_study.dcm"
    copy_with(ct_files[20], bad_study, StudyInstanceUID="../../escape")
    bad_sop = tmp_path / "bad_sop.dcm"
    copy_with(ct_files[21], bad_sop, SOPInstanceUID="../x")
    good = ct_files[22]
    # -nh: keep going after a failed store; all three in one association
    result = shared_node.storescu(bad_study, bad_sop, good, extra=("-nh",))
    out = result.stdout + result.stderr
    assert out.count("Store Response (Error: CannotUnderstand)") == 2, out
    assert out.count("Store Response (Success)") == 1, out
    assert stored_path(shared_node, pydicom.dcmread(good, stop_before_pixels=True)).is_file()
    assert not (shared_node.storage.parent / "escape").exists()
    assert not list(shared_node.storage.rglob("*escape*"))
    assert not list(shared_node.storage.rglob("x.dcm"))
    # a failed store ends storescu with a non-zero exit code without -nh
    assert shared_node.storescu(bad_study).returncode != 0
    # and the node goes on serving other associations
    assert shared_node.echoscu().returncode == 0
    assert shared_node.storescu(ct_files[23]).returncode == 0


def test_unsupported_sop_class_refused(
    shared_node: Node, ct_files: list[Path], tmp_path: Path
) -> None:
    sc = tmp_path / "sc.dcm"
    ds = copy_with(
        ct_files[30], sc, SOPClassUID="1.2.840.10008.5.1.4.1.1.7", SOPInstanceUID=generate_uid()
    )
    result = shared_node.storescu(sc)
    assert result.returncode != 0
    assert "presentation context" in (result.stdout + result.stderr).lower()
    assert not query(
        shared_node, select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
    )


def _compress_dcmtk(tool: str, src: Path, dst: Path) -> None:
    subprocess.run([dcmtk(tool), str(src), str(dst)], check=True, capture_output=True, timeout=60)


def test_compressed_transfer_syntaxes(
    shared_node: Node, mr_files: list[Path], tmp_path: Path
) -> None:
    series_uid = generate_uid()
    made: list[tuple[Path, str, Path]] = []
    # storescu's -x? flag proposes the compressed syntax *plus* uncompressed fallbacks in one
    # presentation context: the node must pick the compressed one (no transcoding).
    for i, (ts, how, flag) in enumerate(
        [
            (JPEGLSLossless, "dcmcjpls", "-xt"),
            (RLELossless, "dcmcrle", "-xr"),
            (JPEGLosslessSV1, "dcmcjpeg", "-xs"),
            (JPEG2000Lossless, "pydicom", "-xv"),
        ]
    ):
        src = tmp_path / f"src{i}.dcm"
        copy_with(mr_files[i], src, SOPInstanceUID=generate_uid(), SeriesInstanceUID=series_uid)
        dst = tmp_path / f"compressed{i}.dcm"
        if how == "pydicom":
            ds = pydicom.dcmread(src)
            ds.compress(ts)
            ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
            subprocess.run([dcmtk("dcmconv"), str(tmp_path / "j2k.dcm"), str(dst)], check=True)
        else:
            _compress_dcmtk(how, src, dst)
        assert pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
        result = shared_node.storescu(dst, extra=(flag,))
        assert result.returncode == 0, result.stdout + result.stderr
        made.append((dst, str(ts), src))
    for dst, ts_uid, src in made:
        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        out = stored_path(shared_node, ds)
        stored = pydicom.dcmread(out)
        assert stored.file_meta.TransferSyntaxUID == ts_uid
        assert dataset_bytes(out) == dataset_bytes(dst)
        original = pydicom.dcmread(src).pixel_array
        assert np.array_equal(stored.pixel_array, original), ts_uid


def test_series_command(
    shared_node: Node, ct_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main

    assert shared_node.storescu(ct_files[40]).returncode == 0
    ds = pydicom.dcmread(ct_files[40], stop_before_pixels=True)
    assert main(["series", "--config", str(shared_node.config_path)]) == 0
    out = capsys.readouterr().out
    assert ds.SeriesInstanceUID in out
    assert "CT" in out and "MODALITY" in out
    assert str(ds.PatientID) not in out
    assert main(["series", "--show-patient", "--config", str(shared_node.config_path)]) == 0
    assert str(ds.PatientID) in capsys.readouterr().out


def test_allow_list_and_hot_reload(node_factory: Callable[..., Node], ct_files: list[Path]) -> None:
    node = node_factory(node={"allowed_calling_aets": ["MODALITY"]})
    assert node.echoscu("MODALITY").returncode == 0
    refused = node.echoscu("NEWAE")
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower()
    assert node.storescu(ct_files[0], calling="NEWAE").returncode != 0
    assert not list(node.storage.rglob("*.dcm"))

    cfg = dict(node.config)
    cfg["node"] = {**cfg["node"], "allowed_calling_aets": ["MODALITY", "NEWAE"]}
    node.write_config(cfg)
    wait_until(lambda: node.echoscu("NEWAE").returncode == 0, timeout=5, what="reload")

    # an invalid edit is rejected; the last good config stays in force
    node.write_config("node:\n  ae_title: FUSIONNODE\n  port: not-a-port\n")
    wait_until(lambda: "config reload rejected" in node.log(), timeout=5, what="rejection")
    assert "node.port" in node.log()
    assert node.echoscu("NEWAE").returncode == 0
    assert node.echoscu("INTRUDER").returncode != 0

    # removing an AE title also applies live
    cfg["node"] = {**cfg["node"], "allowed_calling_aets": ["MODALITY"]}
    node.write_config(cfg)
    wait_until(lambda: node.echoscu("NEWAE").returncode != 0, timeout=5, what="removal")
    assert node.stop() == 0


def test_sigterm_lets_inflight_association_finish(
    node_factory: Callable[..., Node], ct_files: list[Path]
) -> None:
    node = node_factory()
    files = ct_files[:20]
    sender = subprocess.Popen(
        [
            dcmtk("storescu"),
            "-v",
            "--repeat",
            "3",
            "+II",
            "-aet",
            "MODALITY",
            "-aec",
            NODE_AET,
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: next(node.storage.rglob("*.dcm"), None), timeout=30, what="first file")
    node.proc.send_signal(15)
    out, _ = sender.communicate(timeout=60)
    assert sender.returncode == 0, out
    assert node.proc.wait(timeout=60) == 0, node.log()
    successes = out.count("Store Response (Success)")
    assert successes == len(files) * 3
    assert len(list(node.storage.rglob("*.dcm"))) == successes
    assert "received SIGTERM" in node.log()
    assert not port_open(node.port)


def test_max_associations_and_probe_connections(node_factory: Callable[..., Node]) -> None:
    """An idle TCP connection holds one of node.max_associations; a closed probe does not."""
    node = node_factory(node={"max_associations": 1})
    holder = socket.create_connection(("127.0.0.1", node.port))
    try:
        wait_until(lambda: node.echoscu().returncode != 0, timeout=10, what="limit reached")
    finally:
        holder.close()
    wait_until(lambda: node.echoscu().returncode == 0, timeout=5, what="slot freed")
    for _ in range(3):  # port probes (health checks) open and close at once
        socket.create_connection(("127.0.0.1", node.port)).close()
    wait_until(lambda: node.echoscu().returncode == 0, timeout=5, what="probes released")
    assert node.stop() == 0


@pytest.mark.parametrize(
    "sop_class", ["1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.1"], ids=["ECT", "EMR"]
)
def test_enhanced_sop_classes_accepted(
    shared_node: Node, ct_files: list[Path], tmp_path: Path, sop_class: str
) -> None:
    """Enhanced CT / MR Image Storage are negotiated and stored (header-only check here)."""
    f = tmp_path / "enhanced.dcm"
    ds = copy_with(
        ct_files[50],
        f,
        SOPClassUID=sop_class,
        SOPInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    result = shared_node.storescu(f)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = query(
        shared_node, select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
    )
    assert len(rows) == 1
    assert isinstance(rows[0], Instance) and rows[0].sop_class_uid == sop_class
