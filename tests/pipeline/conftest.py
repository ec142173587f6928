"""Shared fixtures of the volume / derive / pipeline tests (small committed MRI-DIR fixtures)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_node.imaging import derive
from dicom_node.imaging.pipeline import DEFAULT_MAX_GAP_MM, mr_slices_per_ct_slice
from dicom_node.imaging.volumes import SeriesVolume, read_series, read_series_dir
from fusion_engine.intensity import ct_to_unit
from tests.peers import FIXTURES, require_binary

SMALL = FIXTURES / "mridir_small"
SMALL_CT = SMALL / "ct"
SMALL_MR = SMALL / "mr"


def _require_fixtures() -> None:
    if not any(SMALL_CT.glob("*.dcm")) or not any(SMALL_MR.glob("*.dcm")):
        pytest.skip(f"fixtures missing in {SMALL} (run tests/fixtures/make_fixtures.py)")


@pytest.fixture(scope="session")
def ct_volume() -> SeriesVolume:
    """The small fixture CT (irregular slice positions: read with the pipeline's gap policy)."""
    _require_fixtures()
    return read_series_dir(SMALL_CT, max_gap_mm=DEFAULT_MAX_GAP_MM)


@pytest.fixture(scope="session")
def mr_volume() -> SeriesVolume:
    """The small fixture MR (regular)."""
    _require_fixtures()
    return read_series_dir(SMALL_MR)


@dataclass
class IdentityOutputs:
    """Derived objects made with an identity transform and a CT-window 'fusion' (no network)."""

    ct: SeriesVolume
    mr: SeriesVolume
    mr_on_ct: sitk.Image
    mask: sitk.Image
    fused: sitk.Image
    mr_slices: list[list[int]]
    fused_ds: list[Dataset]
    registered_ds: list[Dataset]
    reg_ds: Dataset
    options: derive.DeriveOptions


@pytest.fixture(scope="session")
def identity_outputs(ct_volume: SeriesVolume, mr_volume: SeriesVolume) -> IdentityOutputs:
    """Derive all three kinds on the fixture pair without registration or the network."""
    from fusion_engine.registration import resample_to

    transform = sitk.Euler3DTransform()
    mr_on_ct, mask = resample_to(ct_volume.image, mr_volume.image, transform)
    unit = ct_to_unit(sitk.GetArrayViewFromImage(ct_volume.image))
    mr_arr = sitk.GetArrayViewFromImage(mr_on_ct)
    mixed = np.where(
        sitk.GetArrayViewFromImage(mask) > 0,
        0.5 * unit + 0.5 * np.clip(mr_arr / max(float(mr_arr.max()), 1.0), 0, 1),
        unit,
    ).astype(np.float32)
    fused = sitk.GetImageFromArray(mixed)
    fused.CopyInformation(ct_volume.image)
    mr_slices = mr_slices_per_ct_slice(ct_volume, mr_volume, transform, mask)
    opts = derive.DeriveOptions(salt="test", warnings=[])
    return IdentityOutputs(
        ct=ct_volume,
        mr=mr_volume,
        mr_on_ct=mr_on_ct,
        mask=mask,
        fused=fused,
        mr_slices=mr_slices,
        fused_ds=derive.fused_series(
            ct_volume,
            mr_volume,
            fused,
            mr_slices=mr_slices,
            model_version="test-model",
            strategy="test",
            options=opts,
        ),
        registered_ds=derive.registered_mr_series(
            ct_volume, mr_volume, mr_on_ct, mr_slices=mr_slices, options=opts
        ),
        reg_ds=derive.spatial_registration(ct_volume, mr_volume, np.eye(4), options=opts),
        options=opts,
    )


@pytest.fixture
def series_copy(tmp_path: Path) -> Callable[[Path], tuple[Path, list[Dataset]]]:
    """Copy a fixture series folder into tmp; returns (folder, datasets sorted by file name)."""

    def make(src: Path) -> tuple[Path, list[Dataset]]:
        _require_fixtures()
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        files = sorted(dst.glob("*.dcm"))
        return dst, [pydicom.dcmread(f) for f in files]

    return make


def save_all(folder: Path, datasets: list[Dataset]) -> list[Path]:
    """Rewrite ``datasets`` into ``folder`` (replacing its .dcm files); return the paths."""
    for old in folder.glob("*.dcm"):
        old.unlink()
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"IM{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that start with 'Error' (it reports on stderr)."""
    exe = require_binary("dciodvfy", "dicom3tools")
    proc = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (proc.stderr + proc.stdout).splitlines()
    return [line for line in lines if line.startswith("Error")]


PLANE_KEYWORDS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
)


def assert_same_plane(ds: Dataset, ref: Dataset, label: object) -> None:
    """``ds`` carries exactly the image-plane attributes of ``ref`` (as stored strings)."""
    for kw in PLANE_KEYWORDS:
        assert [str(v) for v in np.atleast_1d(ds[kw].value)] == [
            str(v) for v in np.atleast_1d(ref[kw].value)
        ], (label, kw)


def reg_matrix(reg: Dataset, item: int) -> np.ndarray:
    """The 4x4 Frame of Reference Transformation Matrix of RegistrationSequence[item]."""
    seq = reg.RegistrationSequence[item].MatrixRegistrationSequence[0].MatrixSequence[0]
    return np.array([float(v) for v in seq.FrameOfReferenceTransformationMatrix]).reshape(4, 4)


def read_back(ds: Dataset, tmp: Path, name: str) -> Dataset:
    """Write a dataset as a file and read it again (what a receiver sees)."""
    path = tmp / name
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


__all__ = [
    "SMALL_CT",
    "SMALL_MR",
    "IdentityOutputs",
    "dciodvfy_errors",
    "read_back",
    "read_series",
    "save_all",
]
