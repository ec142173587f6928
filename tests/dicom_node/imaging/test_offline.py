"""End to end: run_offline / `dicom-node fuse` on the small fixtures (and the full pair)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.config import NodeConfig
from dicom_node.imaging.offline import run_offline
from dicom_node.imaging.pipeline import PipelineResult
from dicom_node.states import DerivedKind
from fusion_engine.intensity import ct_to_unit
from fusion_engine.volume import fuse_volume
from tests.peers import MRIDIR, require_full_data
from tests.peers.dciodvfy import dciodvfy_errors
from tests.support.data import SMALL_CT, SMALL_MR
from tests.support.derived import assert_same_plane, reg_matrix


@dataclass
class OfflineRun:
    """One run_offline on the fixtures and its output folder."""

    out: Path
    result: PipelineResult


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> OfflineRun:
    """run_offline with the default strategy on the small fixture pair."""
    if not any(SMALL_CT.glob("*.dcm")):
        pytest.skip("small fixtures missing")
    out = tmp_path_factory.mktemp("offline")
    result, _ = run_offline(SMALL_CT, SMALL_MR, out, config=NodeConfig(), progress=False)
    return OfflineRun(out, result)


@pytest.mark.slow
def test_offline_outputs(offline_run: OfflineRun) -> None:
    out = offline_run.out
    ct_files = sorted(SMALL_CT.glob("*.dcm"))
    fused = sorted((out / "fused").glob("*.dcm"))
    reg_mr = sorted((out / "registered_mr").glob("*.dcm"))
    reg = sorted((out / "reg").glob("*.dcm"))
    assert len(fused) == len(reg_mr) == len(ct_files) and len(reg) == 1
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {
        "read",
        "register",
        "resample",
        "fuse",
        "derive",
        "write",
        "preview",
    }
    assert summary["series"]["fused"]["instances"] == len(ct_files)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_offline_geometry_equals_ct_per_instance(offline_run: OfflineRun) -> None:
    out = offline_run.out
    ct = {}
    for p in SMALL_CT.glob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        ct[str(ds.SOPInstanceUID)] = ds
    for folder in ("fused", "registered_mr"):
        seen = set()
        for p in (out / folder).glob("*.dcm"):
            ds = pydicom.dcmread(p)
            src = (
                ct[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
                if (folder == "fused")
                else None
            )
            match = src or next(
                c
                for c in ct.values()
                if np.allclose(
                    [float(v) for v in c.ImagePositionPatient],
                    [float(v) for v in ds.ImagePositionPatient],
                )
            )
            seen.add(str(match.SOPInstanceUID))
            assert_same_plane(ds, match, folder)
            assert ds.FrameOfReferenceUID == match.FrameOfReferenceUID
            assert ds.StudyInstanceUID == match.StudyInstanceUID
            assert ds.pixel_array.shape == (match.Rows, match.Columns)
        assert seen == set(ct), folder


@pytest.mark.slow
def test_offline_registration_and_reg_file(offline_run: OfflineRun) -> None:
    """The written REG matrix maps MR points onto the CT points the registration found."""
    result = offline_run.result
    assert result.quality.mask_dice >= 0.8
    assert result.transform is not None
    reg = pydicom.dcmread(next((offline_run.out / "reg").glob("*.dcm")))
    m = reg_matrix(reg, 1)
    ct_img = result.images["ct"]
    for index in ((10, 20, 30), (64, 64, 200), (100, 90, 350)):
        p_ct = np.array(ct_img.TransformIndexToPhysicalPoint(index))
        q_mr = np.array(result.transform.TransformPoint(tuple(p_ct)))
        np.testing.assert_allclose((m @ np.append(q_mr, 1))[:3], p_ct, atol=1e-3)
    # The planner sees the registration warning (the MRI-DIR pair needs a ~180 degree turn).
    if result.quality.warnings:
        fused = pydicom.dcmread(next((offline_run.out / "fused").glob("*.dcm")))
        assert fused.SeriesDescription.startswith("CHECK REG!")
        assert reg.SeriesDescription.startswith("CHECK REG!")


@pytest.mark.slow
@pytest.mark.peers
def test_offline_dciodvfy_clean(offline_run: OfflineRun) -> None:
    out = offline_run.out
    for folder in ("fused", "registered_mr", "reg"):
        files = sorted((out / folder).glob("*.dcm"))
        for path in (files[0], files[len(files) // 2], files[-1]):
            assert dciodvfy_errors(path) == [], path


@pytest.mark.slow
def test_registered_mr_aligns_with_ct(offline_run: OfflineRun) -> None:
    """Head outlines of CT and registered MR overlap (inside the MR's field of view)."""
    imgs = offline_run.result.images
    ct = sitk.GetArrayViewFromImage(imgs["ct"])
    mr = sitk.GetArrayViewFromImage(imgs["mr_on_ct"])
    fov = sitk.GetArrayViewFromImage(imgs["mask"]) > 0
    head_ct = (ct > -400) & fov
    head_mr = (mr > np.percentile(mr[fov], 60) * 0.3) & fov
    dice = 2 * (head_ct & head_mr).sum() / (head_ct.sum() + head_mr.sum())
    assert dice > 0.8


def test_fuse_volume_policy_outside_mr() -> None:
    """Outside the MR mask the fused volume is exactly the CT window image."""
    rng = np.random.default_rng(0)
    ct_arr = rng.uniform(-1000, 1500, size=(6, 32, 32)).astype(np.float32)
    mr_arr = rng.uniform(0, 1000, size=(6, 32, 32)).astype(np.float32)
    mask_arr = np.zeros((6, 32, 32), np.uint8)
    mask_arr[1:4, 8:24, 8:24] = 1
    images = []
    for arr in (ct_arr, mr_arr, mask_arr):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 2.0))
        images.append(img)
    calls: list[tuple[int, int]] = []
    out = sitk.GetArrayFromImage(
        fuse_volume(
            *images,
            strategy="average",
            device="cpu",
            batch_size=2,
            progress=lambda d, t: calls.append((d, t)),
        )
    )
    unit = ct_to_unit(ct_arr)
    outside = mask_arr == 0
    np.testing.assert_array_equal(out[outside], unit[outside])
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert calls[-1] == (3, 3)  # only the 3 slices with MR data went through the network
    # A subset of slices: the slices between are interpolated, the rest CT window.
    sub = sitk.GetArrayFromImage(
        fuse_volume(*images, strategy="average", device="cpu", slices=[1, 3])
    )
    np.testing.assert_allclose(sub[2], 0.5 * (sub[1] + sub[3]), atol=1e-6)
    np.testing.assert_array_equal(sub[0], unit[0])


def test_fuse_volume_does_not_depend_on_batch_size() -> None:
    """One crop box per volume: a slice's result is the same whatever shares its batch."""
    zz, yy, xx = np.mgrid[0:5, 0:64, 0:64]
    radius = 8 + 4 * zz  # the head grows from slice to slice
    inside = (yy - 32) ** 2 + (xx - 32) ** 2 < radius**2
    rng = np.random.default_rng(1)
    ct_arr = np.where(inside, rng.uniform(-100, 200, inside.shape), -1000).astype(np.float32)
    mr_arr = np.where(inside, rng.uniform(100, 900, inside.shape), 0).astype(np.float32)
    mask_arr = np.ones(inside.shape, np.uint8)
    images = [sitk.GetImageFromArray(a) for a in (ct_arr, mr_arr, mask_arr)]
    one = sitk.GetArrayFromImage(fuse_volume(*images, device="cpu", batch_size=1))
    three = sitk.GetArrayFromImage(fuse_volume(*images, device="cpu", batch_size=3))
    np.testing.assert_allclose(one, three, atol=1e-6)
    assert not np.allclose(one[inside], ct_to_unit(ct_arr)[inside], atol=1e-3)  # MR went in


@pytest.mark.slow
def test_cli_fuse(tmp_path: Path) -> None:
    """`dicom-node fuse` writes the three kinds and the preview (subprocess, like a user)."""
    exe = shutil.which("dicom-node")
    cmd = [exe] if exe else [sys.executable, "-m", "dicom_node.cli"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *cmd,
            "fuse",
            "--ct",
            str(SMALL_CT),
            "--mr",
            str(SMALL_MR),
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "preview.png").exists()
    assert len(list((out / "reg").glob("*.dcm"))) == 1
    assert "register" in proc.stdout


@pytest.mark.slow
@pytest.mark.fulldata
def test_full_mridir_pair(tmp_path: Path) -> None:
    """The full MRI-DIR pair: CT geometry kept per instance, dciodvfy clean, aligned."""
    require_full_data(MRIDIR)
    result, _ = run_offline(
        MRIDIR / "ct", MRIDIR / "mr", tmp_path, config=NodeConfig(), progress=False
    )
    assert len(result.datasets[DerivedKind.FUSED]) == len(list((MRIDIR / "ct").glob("*.dcm")))
    assert result.quality.mask_dice >= 0.8
    for folder in ("fused", "registered_mr", "reg"):
        path = sorted((tmp_path / folder).glob("*.dcm"))[0]
        assert dciodvfy_errors(path) == [], path


def test_preview_lps_view_matches_dicomorient() -> None:
    """The cheap LPS view equals SimpleITK's DICOMOrient for every axis-aligned direction."""
    import itertools

    from dicom_node.imaging.preview import _lps_view

    rng = np.random.default_rng(0)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            d = np.zeros((3, 3))
            for i in range(3):
                d[perm[i], i] = signs[i]
            img = sitk.GetImageFromArray(rng.random((4, 5, 6)).astype(np.float32))
            img.SetSpacing((1.0, 2.0, 3.0))
            img.SetDirection(d.ravel().tolist())
            ref = sitk.DICOMOrient(img, "LPS")
            view, spacing, _ = _lps_view(img)
            np.testing.assert_array_equal(view, sitk.GetArrayViewFromImage(ref))
            assert spacing == pytest.approx(ref.GetSpacing())


def test_preview_png(tmp_path: Path) -> None:
    from dicom_node.imaging.preview import write_preview

    arr = np.zeros((20, 40, 30), np.float32)
    arr[5:15, 10:30, 5:25] = 100.0
    images = []
    for a in (arr, arr, (arr > 0).astype(np.uint8), arr / 100.0):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.0, 1.0, 2.5))
        img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
        images.append(img)
    path = write_preview(
        tmp_path / "p.png",
        ct=images[0],
        mr_on_ct=images[1],
        mask=images[2],
        fused=images[3],
        warnings=["registration rotates the MR by 178 degrees"],
    )
    assert path.read_bytes()[:4] == b"\x89PNG"
