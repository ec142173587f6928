"""Head masks and what they tell the search: points, centre, axes, where a field of view cuts.

The masks only choose sample points and starting poses; no decision about reliability rests on
them. Neither mask assumes that its image holds the whole head: closing is edge-padded, holes are
filled slice by slice as well (a slab leaves open "holes" at its ends), and the axes along
which a mask touches the end of its image are reported so that the search can slide one image
along the other.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from fusion_engine.errors import RegistrationError
from fusion_engine.registration.geometry import FloatArray, index_to_physical
from fusion_engine.registration.images import Filters, Level

CT_TISSUE_HU = -400.0
"""CT numbers above this are tissue (air is about -1000 HU, fat about -100 HU)."""

CUT_MIN_VOXELS = 10
"""A mask with at least this many voxels on an end face of its image is cut there."""

PADDING_FRACTION = 0.02
"""When more MR voxels than this hold exactly the minimum value, they are padding (e.g. zeros
outside the reconstructed field of view) and stay out of the threshold's histogram."""

SEED = 20231
"""Seed of every random subsample in the registration (results are reproducible)."""

BoolArray = npt.NDArray[np.bool_]


def _mr_threshold(values: npt.NDArray[np.float32]) -> float:
    """Otsu's threshold of log intensities: separates tissue from background noise whatever
    the contrast (dark tissues such as muscle on T2 stay above it, which Otsu on the linear
    intensities of a bright-fat, bright-fluid image does not achieve)."""
    finite = values[np.isfinite(values)]
    floor = float(finite.min())
    if np.mean(finite == floor) > PADDING_FRACTION:
        finite = finite[finite > floor]  # zero-filled outside the reconstructed field of view
    if finite.size == 0:
        raise RegistrationError("MR image is constant; no head to register")
    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    if hi <= lo:
        raise RegistrationError("MR image is constant; no head to register")
    clipped = np.clip(finite, lo, hi) - lo
    logs = np.log1p(clipped / max(hi - lo, 1e-6) * 1000.0)
    hist, edges = np.histogram(logs, bins=256)
    centers = (edges[:-1] + edges[1:]) / 2.0
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centers)
    total, grand = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (grand * weight - total * mean) ** 2 / (weight * (total - weight))
    k = int(np.nanargmax(np.where(np.isfinite(between), between, np.nan)))
    return float(np.expm1(centers[k]) / 1000.0 * (hi - lo) + lo)


def head_mask(level: Level, is_ct: bool, filters: Filters) -> sitk.Image:
    """Largest tissue object, closed and hole-filled, as a uint8 0/1 image.

    CT: above :data:`CT_TISSUE_HU`. MR: above Otsu's threshold of the log intensities.
    """
    arr = level.array
    if not np.any(np.isfinite(arr)):
        raise RegistrationError("image has no finite values")
    threshold = CT_TISSUE_HU if is_ct else _mr_threshold(arr)
    tissue = np.nan_to_num(arr, nan=-np.inf) > threshold
    opened = ndimage.binary_opening(tissue, structure=ndimage.generate_binary_structure(3, 1))
    labels, count = ndimage.label(opened)
    if count == 0:
        raise RegistrationError("no object found above the tissue threshold")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    out = sitk.GetImageFromArray(_fill(largest).astype(np.uint8))
    out.CopyInformation(level.image)
    return out


def _fill(mask: BoolArray) -> BoolArray:
    """Edge-padded closing, then hole filling in 3-D and slice by slice."""
    pad = 2
    padded = np.pad(mask, pad, mode="edge")
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3, 3)), iterations=pad)
    out: BoolArray = ndimage.binary_fill_holes(closed[pad:-pad, pad:-pad, pad:-pad])
    for k in range(out.shape[0]):
        out[k] = ndimage.binary_fill_holes(out[k])
    return out


def dilated(mask: sitk.Image, radius: int, filters: Filters) -> sitk.Image:
    """``mask`` dilated by ``radius`` voxels (box)."""
    filt = sitk.BinaryDilateImageFilter()
    filt.SetKernelRadius(radius)
    filt.SetForegroundValue(1)
    return filters.run(filt, mask)


def mask_on(mask: sitk.Image, reference: sitk.Image, filters: Filters) -> sitk.Image:
    """A mask resampled (nearest neighbour) onto another grid of the same image."""
    return filters.resample(
        mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8
    )


def voxel_points(
    mask: sitk.Image, count: int | None, seed: int = SEED
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Physical points (mm) and (z, y, x) indices of at most ``count`` mask voxels."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    if count is not None and idx.shape[0] > count:
        # Sorted, so that mapped points visit the other image in order (cache-friendly).
        idx = idx[np.sort(np.random.default_rng(seed).choice(idx.shape[0], count, replace=False))]
    a, o = index_to_physical(mask)
    pts: FloatArray = idx[:, ::-1].astype(np.float64) @ a.T + o
    return pts, idx.astype(np.int64)


def moments(mask: sitk.Image) -> tuple[FloatArray, FloatArray]:
    """Centre (mm) and principal axes (columns, by decreasing variance) of a mask."""
    pts, _ = voxel_points(mask, None)
    if pts.shape[0] < 10:
        raise RegistrationError("head mask is empty")
    center = pts.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((pts - center).T))
    axes: FloatArray = vecs[:, ::-1]
    return center, axes


def cut_axes(mask: sitk.Image) -> list[int]:
    """Index axes (0 = x, 1 = y, 2 = z) along which the mask touches an end of its image."""
    arr = sitk.GetArrayViewFromImage(mask) > 0
    cut = []
    for axis in range(3):
        np_axis = 2 - axis
        first = int(np.take(arr, 0, axis=np_axis).sum())
        last = int(np.take(arr, arr.shape[np_axis] - 1, axis=np_axis).sum())
        if max(first, last) >= CUT_MIN_VOXELS:
            cut.append(axis)
    return cut


def mask_dice(
    ct_mask: sitk.Image, mr_mask: sitk.Image, transform: sitk.Transform, filters: Filters
) -> tuple[float, float]:
    """(Dice of the two head masks inside the MR field of view, fraction of the CT head mask
    that lies in that view) under ``transform`` (CT point -> MR point). Shown, never decided on:
    masks of different contrasts disagree by their own error."""
    moved = filters.resample(
        mr_mask, ct_mask, transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8
    )
    ones = sitk.Image(mr_mask.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(mr_mask)
    fov = filters.resample(ones, ct_mask, transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    f = sitk.GetArrayViewFromImage(ct_mask) > 0
    m = sitk.GetArrayViewFromImage(moved) > 0
    v = sitk.GetArrayViewFromImage(fov) > 0
    fv = f & v
    denom = int(fv.sum()) + int((m & v).sum())
    dice = 2.0 * int((fv & m).sum()) / denom if denom else 0.0
    return dice, float(fv.sum()) / max(int(f.sum()), 1)
