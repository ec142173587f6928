"""Stored DICOM series -> SimpleITK volume in LPS patient coordinates.

:func:`read_series` turns the files of one image series into a float32 ``sitk.Image`` whose
origin, spacing and direction are the DICOM patient geometry (LPS, millimetres):

* slices are ordered by their position along the slice normal (``cross(row, column)`` of
  ImageOrientationPatient), never by InstanceNumber;
* Rescale Slope/Intercept are applied per slice (per frame for Enhanced objects), so CT voxels
  are Hounsfield units;
* compressed pixel data is decoded by pydicom's pixel handlers (pylibjpeg plugins: JPEG,
  JPEG-LS, JPEG 2000, RLE);
* Enhanced / Legacy Converted Enhanced CT and MR (one multi-frame instance) are read from
  their shared and per-frame functional groups.

A series that cannot be one regular 3-D grid raises :class:`~dicom_node.errors.SeriesError`
whose message names the series and the cause: a missing slice (a gap larger than the
tolerance), irregular spacing, duplicate positions, mixed orientations, gantry tilt (slices
sheared along the normal), a single-slice or localizer series, mixed sizes or spacings, mixed
series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import SeriesError

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines still counted as the same orientation."""

MAX_LATTICE_DIVISOR = 4
"""With gaps allowed, the lattice step may be the smallest slice step divided by up to this."""

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class SeriesVolume:
    """One image series as a volume plus the datasets (without pixels) it came from.

    ``datasets[k]`` is the instance of source slice ``k`` (order along the normal) and
    ``slice_indices[k]`` its z index in ``image``: ``0..N-1`` for a regular series; for a
    series with allowed gaps the image is the full regular lattice and the indices skip the
    interpolated slices. For a multi-frame instance the same dataset repeats and
    ``frame_numbers[k]`` is its 1-based frame; single-frame instances have ``None``.
    """

    image: sitk.Image
    datasets: list[Dataset]
    sop_class_uid: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    frame_numbers: list[int | None] = field(default_factory=list)
    slice_indices: list[int] = field(default_factory=list)
    interpolated_slices: int = 0

    def __post_init__(self) -> None:
        if not self.frame_numbers:
            self.frame_numbers = [None] * len(self.datasets)
        if not self.slice_indices:
            self.slice_indices = list(range(len(self.datasets)))

    @property
    def instances(self) -> list[Dataset]:
        """The distinct source instances, in slice order (one per SOPInstanceUID)."""
        seen: set[str] = set()
        out: list[Dataset] = []
        for ds in self.datasets:
            uid = str(ds.SOPInstanceUID)
            if uid not in seen:
                seen.add(uid)
                out.append(ds)
        return out

    @property
    def description(self) -> str:
        """Short human name of the series for messages (modality, number, description)."""
        return _series_name(self.datasets[0]) if self.datasets else self.series_uid


@dataclass
class _Slice:
    position: npt.NDArray[np.float64]
    pixels: npt.NDArray[np.float32]
    dataset: Dataset
    frame: int | None


def _series_name(ds: Dataset) -> str:
    desc = str(ds.get("SeriesDescription", "") or "").strip()
    number = ds.get("SeriesNumber", "")
    uid = str(ds.get("SeriesInstanceUID", "?"))
    label = f"{ds.get('Modality', '?')} series {number}".strip()
    if desc:
        label += f" '{desc}'"
    return f"{label} ({uid})"


def _floats(value: Any, n: int, what: str, name: str) -> npt.NDArray[np.float64]:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{name}: unreadable {what} {value!r}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{name}: {what} must have {n} finite values, got {value!r}")
    return arr


def _unit_vectors(
    iop: npt.NDArray[np.float64], name: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    row, col = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 0.5 or nc < 0.5:
        raise SeriesError(f"{name}: degenerate ImageOrientationPatient {iop.tolist()}")
    row, col = row / nr, col / nc
    if abs(float(row @ col)) > 1e-2:
        raise SeriesError(f"{name}: ImageOrientationPatient row and column are not orthogonal")
    normal = np.cross(row, col)
    return row, col, normal / float(np.linalg.norm(normal))


def _rescale(pixels: npt.NDArray[Any], slope: float, intercept: float) -> npt.NDArray[np.float32]:
    out = pixels.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _strip_pixels(ds: Dataset) -> Dataset:
    for kw in _PIXEL_KEYWORDS:
        if kw in ds:
            delattr(ds, kw)
    return ds


def _check_image_type(ds: Dataset, name: str) -> None:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        raise SeriesError(f"{name}: localizer (scout) series, not a volume")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesError(f"{name}: colour images (SamplesPerPixel != 1) are not supported")


def _decode(ds: Dataset, name: str) -> npt.NDArray[Any]:
    try:
        arr: npt.NDArray[Any] = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise SeriesError(
            f"{name}: cannot decode pixel data of {ds.get('SOPInstanceUID', '?')} "
            f"(transfer syntax {ts}): {exc}"
        ) from exc
    # MONOCHROME1 only inverts the display; stored values (and HU after rescale) keep their
    # meaning, so nothing is inverted here.
    return arr


def _single_frame_slices(
    datasets: Sequence[Dataset], name: str
) -> tuple[list[_Slice], npt.NDArray[np.float64], tuple[float, float], tuple[int, int]]:
    first = datasets[0]
    iop0 = _floats(first.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", name)
    ps0 = _floats(first.get("PixelSpacing"), 2, "PixelSpacing", name)
    size0 = (int(first.Rows), int(first.Columns))
    slices: list[_Slice] = []
    for ds in datasets:
        _check_image_type(ds, name)
        if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
            raise SeriesError(
                f"{name}: instance {ds.get('SOPInstanceUID', '?')} has no patient geometry "
                "(ImagePositionPatient/ImageOrientationPatient)"
            )
        iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", name)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"{name}: mixed orientations ({iop0.round(4).tolist()} and {iop.round(4).tolist()})"
            )
        size = (int(ds.Rows), int(ds.Columns))
        if size != size0:
            raise SeriesError(
                f"{name}: mixed image sizes ({size0[0]}x{size0[1]} and {size[0]}x{size[1]})"
            )
        ps = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", name)
        if np.max(np.abs(ps - ps0)) > 1e-4:
            raise SeriesError(f"{name}: mixed pixel spacings ({ps0.tolist()} and {ps.tolist()})")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SeriesError(f"{name}: mixes multi-frame and single-frame instances")
        arr = _decode(ds, name)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        pos = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", name)
        slices.append(_Slice(pos, _rescale(arr, slope, intercept), _strip_pixels(ds), None))
    return slices, iop0, (float(ps0[0]), float(ps0[1])), size0


def _group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The item of a functional group macro for one frame (per-frame first, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        item = per_frame[frame_index]
        if sequence in item and len(item[sequence].value) > 0:
            return item[sequence].value[0]  # type: ignore[no-any-return]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        item = shared[0]
        if sequence in item and len(item[sequence].value) > 0:
            return item[sequence].value[0]  # type: ignore[no-any-return]
    return None


def _multi_frame_slices(
    ds: Dataset, name: str
) -> tuple[list[_Slice], npt.NDArray[np.float64], tuple[float, float], tuple[int, int]]:
    _check_image_type(ds, name)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise SeriesError(
            f"{name}: multi-frame instance without functional groups (not an Enhanced CT/MR object)"
        )
    pixels = _decode(ds, name)
    if n_frames == 1:
        pixels = pixels[np.newaxis]
    size = (int(ds.Rows), int(ds.Columns))
    iop0: npt.NDArray[np.float64] | None = None
    ps0: npt.NDArray[np.float64] | None = None
    slices: list[_Slice] = []
    stripped = _strip_pixels(ds)
    for i in range(n_frames):
        orient = _group_item(ds, i, "PlaneOrientationSequence")
        plane = _group_item(ds, i, "PlanePositionSequence")
        measures = _group_item(ds, i, "PixelMeasuresSequence")
        if orient is None or plane is None or measures is None:
            raise SeriesError(
                f"{name}: frame {i + 1} lacks plane position/orientation or pixel measures"
            )
        iop = _floats(orient.ImageOrientationPatient, 6, "ImageOrientationPatient", name)
        ps = _floats(measures.PixelSpacing, 2, "PixelSpacing", name)
        if iop0 is None or ps0 is None:
            iop0, ps0 = iop, ps
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"{name}: mixed orientations ({iop0.round(4).tolist()} and {iop.round(4).tolist()})"
            )
        if np.max(np.abs(ps - ps0)) > 1e-4:
            raise SeriesError(f"{name}: mixed pixel spacings ({ps0.tolist()} and {ps.tolist()})")
        trans = _group_item(ds, i, "PixelValueTransformationSequence")
        slope = float(trans.get("RescaleSlope", 1.0)) if trans is not None else 1.0
        intercept = float(trans.get("RescaleIntercept", 0.0)) if trans is not None else 0.0
        pos = _floats(plane.ImagePositionPatient, 3, "ImagePositionPatient", name)
        slices.append(_Slice(pos, _rescale(pixels[i], slope, intercept), stripped, i + 1))
    if iop0 is None or ps0 is None:
        raise SeriesError(f"{name}: multi-frame instance without frames")
    return slices, iop0, (float(ps0[0]), float(ps0[1])), size


def _order_and_check(
    slices: list[_Slice],
    normal: npt.NDArray[np.float64],
    tolerance_mm: float,
    max_gap_mm: float,
    name: str,
) -> tuple[list[_Slice], float, list[int]]:
    """Sort along the normal and check the stack.

    Returns the ordered slices, the lattice spacing and each slice's index on that lattice.
    Raises on duplicates, tilt, spacing that is not a multiple of the lattice step, and gaps
    (any gap when ``max_gap_mm`` is 0, else gaps wider than ``max_gap_mm``).
    """
    dist = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(dist, kind="stable")
    slices = [slices[i] for i in order]
    dist = dist[order]
    steps = np.diff(dist)
    if np.any(steps < tolerance_mm):
        k = int(np.argmax(steps < tolerance_mm))
        raise SeriesError(
            f"{name}: two slices at the same position ({dist[k]:.3f} mm along the normal); "
            "several acquisitions or temporal phases in one series are not supported"
        )
    # Gantry tilt (or a sheared stack): slice origins must lie on one line along the normal.
    p0 = slices[0].position
    for s in slices[1:]:
        d = s.position - p0
        perpendicular = d - float(d @ normal) * normal
        shift = float(np.linalg.norm(perpendicular))
        if shift > max(tolerance_mm, 1e-3 * float(np.linalg.norm(d))):
            angle = float(np.degrees(np.arctan2(shift, abs(float(d @ normal)))))
            raise SeriesError(
                f"{name}: gantry tilt or sheared slice stack (slice origins drift "
                f"{shift:.2f} mm off the slice normal, {angle:.1f} degrees); not supported"
            )
    # The lattice step: the largest step (smallest step / m, m = 1..MAX_LATTICE_DIVISOR) of
    # which every step is a whole multiple. A regular series has m = 1 and no gaps.
    smallest = float(np.min(steps))
    close = steps[np.abs(steps - smallest) <= tolerance_mm]
    smallest = float(np.mean(close))
    spacing = smallest
    multiples = np.rint(steps / spacing)
    off = np.abs(steps - multiples * spacing)
    for m in range(2, MAX_LATTICE_DIVISOR + 1):
        if not np.any(off > tolerance_mm):
            break
        candidate = smallest / m
        cand_multiples = np.rint(steps / candidate)
        cand_off = np.abs(steps - cand_multiples * candidate)
        if not np.any(cand_off > tolerance_mm):
            spacing, multiples, off = candidate, cand_multiples, cand_off
    if np.any(off > tolerance_mm):
        k = int(np.argmax(off))
        raise SeriesError(
            f"{name}: irregular slice spacing ({steps[k]:.3f} mm between slices at "
            f"{dist[k]:.3f} and {dist[k + 1]:.3f} mm along the normal, not a multiple of "
            f"{spacing:.3f} mm)"
        )
    gaps = np.flatnonzero(multiples > 1)
    if gaps.size:
        k = int(gaps[np.argmax(steps[gaps])])
        gap = float(steps[k])
        missing = int(np.sum(multiples[gaps] - 1))
        if max_gap_mm <= 0.0 or gap > max_gap_mm + tolerance_mm:
            limit = "" if max_gap_mm <= 0.0 else f" (largest allowed gap {max_gap_mm:.2f} mm)"
            raise SeriesError(
                f"{name}: missing slice(s) — gap of {gap:.3f} mm between slices at "
                f"{dist[k]:.3f} and {dist[k + 1]:.3f} mm along the normal, expected "
                f"{spacing:.3f} mm; {missing} slice position(s) missing in all{limit}"
            )
    indices = [0, *np.cumsum(multiples).astype(int).tolist()]
    return slices, spacing, indices


def _fill_lattice(slices: list[_Slice], indices: list[int]) -> npt.NDArray[np.float32]:
    """Stack slices on their lattice indices; missing lattice slices are linearly interpolated."""
    first = slices[0].pixels
    volume = np.empty((indices[-1] + 1, *first.shape), dtype=np.float32)
    for k, s in enumerate(slices):
        volume[indices[k]] = s.pixels
        if k > 0 and indices[k] - indices[k - 1] > 1:
            lo, hi = indices[k - 1], indices[k]
            a, b = slices[k - 1].pixels, s.pixels
            for j in range(lo + 1, hi):
                w = np.float32((j - lo) / (hi - lo))
                volume[j] = (1 - w) * a + w * b
    return volume


def read_series(
    paths: Sequence[Path], *, max_gap_mm: float, tolerance_mm: float = 0.1
) -> SeriesVolume:
    """Read the files of one series into a :class:`SeriesVolume` (float32, LPS, rescaled).

    Raises :class:`SeriesError` naming the series and the cause when the files are not one
    regular volume. With ``max_gap_mm=0`` any missing slice is an error; with
    ``max_gap_mm > 0`` (the configured ``volumes.max_gap_mm``) slice positions may skip lattice
    steps (gaps up to ``max_gap_mm``): the image then holds the whole lattice with the missing
    slices linearly interpolated (``SeriesVolume.slice_indices`` says where the real slices
    are, ``interpolated_slices`` how many were filled in).
    """
    datasets = _read_files(paths)
    name = _series_name(datasets[0])
    slices, iop, ps, size = _slices(datasets, name)
    ref = slices[0].dataset
    if float(ref.get("GantryDetectorTilt", 0.0) or 0.0) != 0.0:
        raise SeriesError(
            f"{name}: gantry tilt of {float(ref.GantryDetectorTilt):.1f} degrees; not supported"
        )
    for_uid = str(ref.get("FrameOfReferenceUID", "") or "")
    if not for_uid:
        raise SeriesError(f"{name}: no FrameOfReferenceUID")
    row, col, normal = _unit_vectors(iop, name)
    ordered, spacing, indices = _order_and_check(slices, normal, tolerance_mm, max_gap_mm, name)
    volume = _fill_lattice(ordered, indices)
    for s in ordered:
        s.pixels = np.empty((0, 0), dtype=np.float32)  # free per-slice copies early
    image = sitk.GetImageFromArray(volume)
    # PixelSpacing = (between rows, between columns); ITK x runs along a row.
    image.SetSpacing((ps[1], ps[0], spacing))
    image.SetOrigin(tuple(float(v) for v in ordered[0].position))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    log.info(
        "read %s: %d slices %dx%d, spacing %.3f x %.3f x %.3f mm",
        ref.get("SeriesInstanceUID", "?"),
        len(ordered),
        size[0],
        size[1],
        ps[1],
        ps[0],
        spacing,
    )
    return SeriesVolume(
        image=image,
        datasets=[s.dataset for s in ordered],
        sop_class_uid=str(ref.SOPClassUID),
        series_uid=str(ref.SeriesInstanceUID),
        study_uid=str(ref.StudyInstanceUID),
        frame_of_reference_uid=for_uid,
        modality=str(ref.get("Modality", "")),
        frame_numbers=[s.frame for s in ordered],
        slice_indices=indices,
        interpolated_slices=int(volume.shape[0] - len(ordered)),
    )


def _read_files(paths: Sequence[Path]) -> list[Dataset]:
    """The datasets of one series' files (at least one; all of one series; with pixels)."""
    if not paths:
        raise SeriesError("no files given for the series")
    datasets: list[Dataset] = []
    for path in sorted(paths):
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError) as exc:
            raise SeriesError(f"cannot read {path}: {exc}") from exc
    name = _series_name(datasets[0])
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise SeriesError(f"{name}: files of {len(series_uids)} different series given")
    if "PixelData" not in datasets[0] and "FloatPixelData" not in datasets[0]:
        raise SeriesError(f"{name}: instances have no pixel data (not an image series)")
    return datasets


def _slices(
    datasets: list[Dataset], name: str
) -> tuple[list[_Slice], npt.NDArray[np.float64], tuple[float, float], tuple[int, int]]:
    """The slices of single-frame instances or of one Enhanced multi-frame instance."""
    multi = [
        ds
        for ds in datasets
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds
    ]
    if multi:
        if len(datasets) != 1:
            raise SeriesError(
                f"{name}: {len(datasets)} multi-frame instances in one series; "
                "expected one Enhanced CT/MR instance"
            )
        slices, iop, ps, size = _multi_frame_slices(datasets[0], name)
    else:
        slices, iop, ps, size = _single_frame_slices(datasets, name)
    if len(slices) < 2:
        raise SeriesError(f"{name}: single-slice series (a volume needs at least 2 slices)")
    return slices, iop, ps, size


def series_files(directory: Path) -> dict[str, list[Path]]:
    """Group the DICOM files under ``directory`` (recursively) by SeriesInstanceUID.

    Files that are not DICOM (README, LICENSE, DICOMDIR without images) are skipped.
    """
    groups: dict[str, list[Path]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPClassUID"]
            )
        except (InvalidDicomError, OSError, ValueError, EOFError):
            log.debug("skipping non-DICOM file %s", path)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            groups.setdefault(uid, []).append(path)
    return groups


def read_series_dir(
    directory: Path, *, max_gap_mm: float, tolerance_mm: float = 0.1
) -> SeriesVolume:
    """Read the one image series stored under ``directory``; error if there are none or many."""
    if not directory.is_dir():
        raise SeriesError(f"{directory} is not a directory")
    groups = series_files(directory)
    if not groups:
        raise SeriesError(f"{directory}: no DICOM series found")
    if len(groups) > 1:
        sizes = ", ".join(f"{uid} ({len(p)} files)" for uid, p in groups.items())
        raise SeriesError(
            f"{directory}: {len(groups)} series found ({sizes}); give one series per directory"
        )
    return read_series(
        next(iter(groups.values())), tolerance_mm=tolerance_mm, max_gap_mm=max_gap_mm
    )
