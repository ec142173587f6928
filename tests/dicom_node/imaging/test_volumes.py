"""volumes.read_series: geometry, ordering, rescale, compression, multi-frame, bad series."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_node.config import DEFAULT_MAX_GAP_MM
from dicom_node.errors import SeriesError
from dicom_node.imaging.volumes import SeriesVolume, read_series, read_series_dir
from tests.support.data import SMALL_CT, SMALL_MR, save_all

Copier = Callable[[Path], tuple[Path, list[Dataset]]]


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _pos(ds: Dataset) -> float:
    return float(_normal(ds) @ np.array(ds.ImagePositionPatient, dtype=float))


def test_mr_geometry_matches_headers(mr_volume: SeriesVolume) -> None:
    files = [pydicom.dcmread(p) for p in sorted(SMALL_MR.glob("*.dcm"))]
    files.sort(key=_pos)
    img = mr_volume.image
    assert img.GetSize() == (int(files[0].Columns), int(files[0].Rows), len(files))
    ps = [float(v) for v in files[0].PixelSpacing]
    assert img.GetSpacing()[:2] == pytest.approx((ps[1], ps[0]))
    assert img.GetSpacing()[2] == pytest.approx(abs(_pos(files[1]) - _pos(files[0])), abs=1e-3)
    assert img.GetOrigin() == pytest.approx([float(v) for v in files[0].ImagePositionPatient])
    iop = [float(v) for v in files[0].ImageOrientationPatient]
    d = np.array(img.GetDirection()).reshape(3, 3)
    assert d[:, 0] == pytest.approx(iop[:3])
    assert d[:, 1] == pytest.approx(iop[3:])
    # Every slice sits where its IPP says, voxel (0, 0, k) -> IPP of slice k.
    for k, ds in enumerate(files):
        assert img.TransformIndexToPhysicalPoint((0, 0, k)) == pytest.approx(
            [float(v) for v in ds.ImagePositionPatient], abs=1e-3
        )
    assert [str(d.SOPInstanceUID) for d in mr_volume.datasets] == [
        str(d.SOPInstanceUID) for d in files
    ]
    assert all("PixelData" not in d for d in mr_volume.datasets)


def test_ct_rescale_to_hounsfield(ct_volume: SeriesVolume) -> None:
    arr = sitk.GetArrayViewFromImage(ct_volume.image)
    for k in (0, len(ct_volume.datasets) // 2):
        ds = pydicom.dcmread(
            next(
                p
                for p in SMALL_CT.glob("*.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                == ct_volume.datasets[k].SOPInstanceUID
            )
        )
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(arr[ct_volume.slice_indices[k]], hu, atol=1e-3)
    assert float(arr.min()) < -900  # air in HU, not raw stored values


def test_ct_with_gaps_lattice(ct_volume: SeriesVolume) -> None:
    """Real slices land on their lattice index; gaps are interpolated, positions exact."""
    img = ct_volume.image
    assert ct_volume.interpolated_slices == img.GetSize()[2] - len(ct_volume.datasets) > 0
    for k, ds in enumerate(ct_volume.datasets):
        p = img.TransformIndexToPhysicalPoint((0, 0, ct_volume.slice_indices[k]))
        assert p == pytest.approx([float(v) for v in ds.ImagePositionPatient], abs=0.05)


def test_strict_mode_reports_missing_slices() -> None:
    with pytest.raises(SeriesError, match=r"CT series.*missing slice") as info:
        read_series_dir(SMALL_CT, max_gap_mm=0.0)
    assert "2.25." in str(info.value)  # names the series UID


def test_order_by_position_not_instance_number(
    series_copy: Copier, mr_volume: SeriesVolume
) -> None:
    folder, datasets = series_copy(SMALL_MR)
    numbers = list(range(1, len(datasets) + 1))
    random.Random(4).shuffle(numbers)
    for ds, n in zip(datasets, numbers, strict=True):
        ds.InstanceNumber = n
    vol = read_series(save_all(folder, datasets), max_gap_mm=0.0)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(vol.image), sitk.GetArrayViewFromImage(mr_volume.image)
    )
    assert vol.image.GetOrigin() == mr_volume.image.GetOrigin()


def test_missing_slice(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    datasets.sort(key=_pos)
    del datasets[10]
    with pytest.raises(SeriesError, match="missing slice") as info:
        read_series(save_all(folder, datasets), max_gap_mm=0.0)
    assert str(datasets[0].SeriesInstanceUID) in str(info.value)


def test_mixed_orientations(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    datasets[5].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(SeriesError, match="mixed orientations"):
        read_series(save_all(folder, datasets), max_gap_mm=0.0)


def test_gantry_tilt_from_geometry(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    t = np.radians(15.0)
    for ds in datasets:  # tilted image planes, slice origins still stepping along z
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(t)), float(np.sin(t))]
    with pytest.raises(SeriesError, match="gantry tilt"):
        read_series(save_all(folder, datasets), max_gap_mm=0.0)


def test_gantry_tilt_tag(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    for ds in datasets:
        ds.GantryDetectorTilt = "12.5"
    with pytest.raises(SeriesError, match=r"gantry tilt of 12\.5"):
        read_series(save_all(folder, datasets), max_gap_mm=0.0)


def test_single_slice(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    with pytest.raises(SeriesError, match="single-slice"):
        read_series(save_all(folder, datasets[:1]), max_gap_mm=0.0)


def test_localizer(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with pytest.raises(SeriesError, match="localizer"):
        read_series(save_all(folder, datasets), max_gap_mm=0.0)


def test_mixed_sizes(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    ds = datasets[3]
    small = ds.pixel_array[:64, :64].copy()
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    with pytest.raises(SeriesError, match="mixed image sizes"):
        read_series(save_all(folder, datasets), max_gap_mm=0.0)


def test_duplicate_positions(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    dup = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
    dup.SOPInstanceUID = pydicom.uid.generate_uid(prefix="2.25.")
    with pytest.raises(SeriesError, match="same position"):
        read_series(save_all(folder, [*datasets, dup]), max_gap_mm=0.0)


def test_mixed_series(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    datasets[0].SeriesInstanceUID = pydicom.uid.generate_uid(prefix="2.25.")
    with pytest.raises(SeriesError, match="different series"):
        read_series(save_all(folder, datasets), max_gap_mm=0.0)
    with pytest.raises(SeriesError, match="2 series found"):
        read_series_dir(folder, max_gap_mm=0.0)


def test_gap_larger_than_allowed() -> None:
    with pytest.raises(SeriesError, match=r"largest allowed gap 2\.00 mm"):
        read_series_dir(SMALL_CT, max_gap_mm=2.0)


def test_irregular_spacing(series_copy: Copier) -> None:
    folder, datasets = series_copy(SMALL_MR)
    datasets.sort(key=_pos)
    ipp = [float(v) for v in datasets[10].ImagePositionPatient]
    ipp[2] += 1.1  # not on the 2*2.5 mm lattice
    datasets[10].ImagePositionPatient = ipp
    with pytest.raises(SeriesError, match="irregular slice spacing"):
        read_series(save_all(folder, datasets), max_gap_mm=DEFAULT_MAX_GAP_MM)


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
def test_compressed_pixel_data(series_copy: Copier, mr_volume: SeriesVolume, syntax: str) -> None:
    from pydicom.uid import JPEG2000Lossless, RLELossless

    uid = {"rle": RLELossless, "jpeg2000": JPEG2000Lossless}[syntax]
    folder, datasets = series_copy(SMALL_MR)
    for ds in datasets:
        try:
            ds.compress(uid)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"no {syntax} encoder installed: {exc}")
    paths = save_all(folder, datasets)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == uid
    vol = read_series(paths, max_gap_mm=0.0)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(vol.image), sitk.GetArrayViewFromImage(mr_volume.image)
    )


def test_enhanced_multiframe(
    tmp_path: Path, mr_volume: SeriesVolume, ct_volume: SeriesVolume
) -> None:
    """A Legacy Converted Enhanced MR/CT (one multi-frame instance) reads like the originals."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage

    for src, cls, vol, gaps in (
        (SMALL_MR, LegacyConvertedEnhancedMRImage, mr_volume, 0.0),
        (SMALL_CT, LegacyConvertedEnhancedCTImage, ct_volume, DEFAULT_MAX_GAP_MM),
    ):
        legacy = [pydicom.dcmread(p) for p in sorted(src.glob("*.dcm"))]
        random.Random(1).shuffle(legacy)  # frame order must not matter
        enhanced = cls(
            legacy_datasets=legacy,
            series_instance_uid=pydicom.uid.generate_uid(),
            series_number=99,
            sop_instance_uid=pydicom.uid.generate_uid(),
            instance_number=1,
        )
        path = tmp_path / f"{src.name}_enhanced.dcm"
        enhanced.save_as(path, enforce_file_format=True)
        got = read_series([path], max_gap_mm=gaps)
        np.testing.assert_allclose(
            sitk.GetArrayViewFromImage(got.image), sitk.GetArrayViewFromImage(vol.image), atol=1e-3
        )
        assert got.image.GetOrigin() == pytest.approx(vol.image.GetOrigin(), abs=1e-3)
        assert got.image.GetSpacing() == pytest.approx(vol.image.GetSpacing(), abs=1e-4)
        assert len(got.instances) == 1
        assert sorted(f for f in got.frame_numbers if f is not None) == list(
            range(1, len(legacy) + 1)
        )


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="not a directory"):
        read_series_dir(tmp_path / "nope", max_gap_mm=0.0)
    (tmp_path / "README").write_text("not dicom")
    with pytest.raises(SeriesError, match="no DICOM series"):
        read_series_dir(tmp_path, max_gap_mm=0.0)
