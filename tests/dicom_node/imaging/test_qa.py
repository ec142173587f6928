"""The registration QA series: pictures, Secondary Capture objects, and `dicom-node fuse`.

Unit tests render the QA series of the small fixture pair with an identity transform and a
known quality report; the command-line tests run the real ``dicom-node fuse`` on the fixtures
(accepted with a warning) and on the fixture CT with a left-right mirrored MR (refused, review
material written, then delivered with ``--accept-unreliable``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.errors import EXIT_DATA, EXIT_OK
from dicom_node.imaging import qa
from dicom_node.imaging.derive import DeriveOptions
from fusion_engine.registration import Check, RegistrationQuality
from tests.peers.dciodvfy import dciodvfy_errors
from tests.support.data import SMALL_CT, SMALL_MR, mirrored_series, require_small_fixtures
from tests.support.derived import IdentityOutputs

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
FUSE_TIMEOUT = 900


def _quality(reliable: bool = True) -> RegistrationQuality:
    halves = 0.4 if reliable else 9.2
    return RegistrationQuality(
        metric_value=-0.512,
        mask_dice=0.93,
        iterations=40,
        seconds=6.0,
        angle_from_header_deg=3.0,
        warnings=[] if reliable else ["registration unreliable: the halves disagree"],
        checks=[
            Check("optimum", True, 0.1, 1.5, "mm", ""),
            Check("starts", True, 12.0, 12.0, "/12 agree", ""),
            Check("mirror", True, 0.4, 1.0, "x", ""),
            Check("halves", reliable, halves, 5.0, "mm", "the halves disagree"),
        ],
    )


def _series(out: IdentityOutputs, quality: RegistrationQuality, review: qa.Review) -> list[Dataset]:
    images = qa.render(
        out.ct.image,
        out.mr_on_ct,
        out.mask,
        quality,
        warnings=quality.warnings,
        ct_window=(40.0, 400.0),
        review=review,
    )
    options = DeriveOptions(uid_root="2.25", series_number_base=9000, software_version="t")
    return qa.qa_series(
        out.ct, out.mr, images, quality, warnings=quality.warnings, options=options, review=review
    )


def test_qa_series_is_a_geometry_free_secondary_capture(
    identity_outputs: IdentityOutputs, tmp_path: Path
) -> None:
    series = _series(identity_outputs, _quality(), qa.Review())
    ct = identity_outputs.ct.datasets[0]
    assert len(series) == 3
    assert [tuple(ds.PatientOrientation) for ds in series] == [v[2] for v in qa.VIEWS]
    for number, ds in enumerate(series, start=1):
        assert ds.SOPClassUID == SECONDARY_CAPTURE and ds.Modality == "OT"
        assert ds.InstanceNumber == number and ds.SeriesNumber == 9004
        assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID
        assert ds.SeriesInstanceUID == series[0].SeriesInstanceUID
        for geometry in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
            assert geometry not in ds  # a TPS cannot take it for a planning image
        assert ds.PhotometricInterpretation == "RGB" and ds.pixel_array.ndim == 3
        assert ds.BurnedInAnnotation == "NO"
        assert "not for diagnosis" in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
        assert ds.SeriesDescription.endswith("optimum 0.1, halves 0.4 mm")
        assert "evidence: optimum 0.1 mm, starts 12/12 agree" in ds.ImageComments
        sources = {str(r.ReferencedSOPInstanceUID) for r in ds.SourceImageSequence}
        assert str(ct.SOPInstanceUID) in sources
        path = tmp_path / f"qa{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path


def test_qa_pictures_show_the_label_checkerboard_and_edges(
    identity_outputs: IdentityOutputs,
) -> None:
    series = _series(identity_outputs, _quality(), qa.Review())
    for ds in series:
        rgb = ds.pixel_array
        header = rgb[: qa.MARGIN + qa.FONT_PX + 5]
        red = (header[..., 0] > 200) & (header[..., 1] < 120) & (header[..., 2] < 120)
        assert red.sum() > 50  # the label, burnt in red
        body = rgb[qa.MARGIN + 4 * (qa.FONT_PX + 5) :].astype(int)
        yellow = (body[..., 0] - body[..., 2] > 100) & (body[..., 1] - body[..., 2] > 100)
        assert yellow.sum() > 100  # MR edges drawn on the CT (grey elsewhere)
    # The checkerboard mixes CT and MR: its panel differs from the CT alone inside the MR data.
    plane = qa.planes(
        identity_outputs.ct.image, identity_outputs.mr_on_ct, identity_outputs.mask, (40, 400)
    )[0]
    board = qa.checker_panel(plane)[..., 0]
    ct_only = qa._grey(plane.ct)[..., 0]
    assert np.mean(board[plane.mask] != ct_only[plane.mask]) > 0.2
    assert np.all(board[~plane.mask] == ct_only[~plane.mask])


def test_refused_and_accepted_registrations_say_so(identity_outputs: IdentityOutputs) -> None:
    refused = _series(identity_outputs, _quality(False), qa.Review())
    assert refused[0].SeriesDescription.startswith("CHECK REG!")
    assert "UNRELIABLE - not accepted" in refused[0].ImageComments
    accepted = _series(identity_outputs, _quality(False), qa.Review("Dr Who", "2026-01-02 10:00"))
    assert "accepted by Dr Who on 2026-01-02 10:00" in accepted[0].ImageComments
    assert "WARNING: registration unreliable" in accepted[0].ImageComments
    assert not np.array_equal(refused[0].pixel_array, accepted[0].pixel_array)


# ----------------------------------------------------------------------------- dicom-node fuse


def _fuse(tmp_path: Path, mr: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  root: {tmp_path / 'store'}\n")
    cmd = [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "fuse"]
    cmd += ["--ct", str(SMALL_CT), "--mr", str(mr), "--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=FUSE_TIMEOUT, check=False, env=env
    )


@pytest.mark.slow
@pytest.mark.peers
def test_fuse_writes_the_qa_series(tmp_path: Path) -> None:
    require_small_fixtures()
    out = tmp_path / "out"
    proc = _fuse(tmp_path, SMALL_MR, out)
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    files = sorted((out / "qa").glob("*.dcm"))
    assert len(files) == 3
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SECONDARY_CAPTURE
        assert "not for diagnosis" in ds.SeriesDescription
        assert "reliability check passed" in ds.ImageComments
        assert dciodvfy_errors(path) == [], path
    summary = json.loads((out / "summary.json").read_text())
    assert summary["series"]["qa"]["instances"] == 3
    assert summary["quality"]["reliable"] is True


@pytest.mark.slow
@pytest.mark.peers
def test_fuse_refuses_a_mirrored_mr_then_delivers_it_when_accepted(tmp_path: Path) -> None:
    require_small_fixtures()
    mirrored = mirrored_series(SMALL_MR, tmp_path / "mirrored")
    out = tmp_path / "refused"
    proc = _fuse(tmp_path, mirrored, out)
    assert proc.returncode == EXIT_DATA, proc.stdout + proc.stderr
    assert "registration unreliable" in proc.stderr and "--accept-unreliable" in proc.stderr
    assert not (out / "fused").exists()  # nothing for planning
    files = sorted((out / "qa").glob("*.dcm"))
    assert len(files) == 3 and (out / "preview.png").read_bytes()[:4] == b"\x89PNG"
    review = pydicom.dcmread(files[0])
    assert "UNRELIABLE - not accepted" in review.ImageComments
    assert review.SeriesDescription.startswith("CHECK REG!")
    assert json.loads((out / "summary.json").read_text())["quality"]["reliable"] is False

    accepted = tmp_path / "accepted"
    proc = _fuse(tmp_path, mirrored, accepted, "--accept-unreliable")
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    fused = pydicom.dcmread(sorted((accepted / "fused").glob("*.dcm"))[0])
    assert fused.SeriesDescription.startswith("CHECK REG!")
    qa_ds = pydicom.dcmread(sorted((accepted / "qa").glob("*.dcm"))[0])
    assert "accepted by" in qa_ds.ImageComments and "after review" in qa_ds.ImageComments
