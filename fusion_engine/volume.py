"""Fusion of a whole CT volume with the MR resampled onto its grid, slice by slice.

:func:`fuse_volume` prepares the intensities exactly as the model was trained
(:func:`fusion_engine.intensity.ct_to_unit` with the CT window and the MR's robust percentile
scaling from :func:`fusion_engine.intensity.mr_scale`, computed once over the MR voxels inside
its data mask for the whole volume, so slices are scaled alike) and feeds axial slices to
:func:`fusion_engine.inference.fuse` in batches.

Policy where the MR has no data (outside its field of view or beyond its slab): the fused
image holds the CT-window image alone (``ct_to_unit(hu, ct_window)``). Fusing CT with an empty
MR would darken soft tissue and look like a signal void, which a planner could misread; the
CT window is the honest picture of what is known. Slices without any MR data are not sent
through the network at all. Callers say this in the output's description
("CT only outside MR").

Only the bounding box of the imaged object over the whole volume (CT above -500 HU or MR
above 10 % of its scale, after a 3 x 3 opening that drops isolated noise pixels), widened by
:data:`CROP_MARGIN` pixels, goes through the network, the same box for every batch. The margin
exceeds the network's receptive-field radius (13 pixels at most), so every pixel inside the box
is what the whole slice would give (up to rounding). Outside the box both sources are air and
the fused image holds the CT-window image (black), as outside the MR.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TypedDict, Unpack

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from fusion_engine.defaults import DEFAULT_BATCH_SIZE, DEFAULT_CT_WINDOW, DEFAULT_STRATEGY
from fusion_engine.errors import InputError
from fusion_engine.intensity import (
    DEFAULT_MR_PERCENTILES,
    ct_to_unit,
    mr_scale,
)

OUTSIDE_MR_POLICY = "CT window only where the MR has no data"
"""One-line statement of what the fused volume holds outside the MR's data mask."""


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


CROP_MARGIN = 16
"""Pixels added around the object's bounding box (> the network's receptive-field radius)."""

AIR_HU = -500.0
MR_FOREGROUND = 0.1


def object_box(
    ct_hu: npt.NDArray[np.floating], mr_unit: npt.NDArray[np.floating], margin: int = CROP_MARGIN
) -> tuple[slice, slice] | None:
    """In-plane bounding box (rows, cols) of the imaged object over a stack of slices, or None."""
    fg = (ct_hu > AIR_HU) | (mr_unit > MR_FOREGROUND)
    fg = ndimage.binary_opening(fg, structure=np.ones((1, 3, 3), dtype=bool))
    rows = np.flatnonzero(fg.any(axis=(0, 2)))
    cols = np.flatnonzero(fg.any(axis=(0, 1)))
    if rows.size == 0 or cols.size == 0:
        return None
    height, width = fg.shape[1:]
    return (
        slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, height)),
        slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, width)),
    )


def _union_box(boxes: Iterable[tuple[slice, slice] | None]) -> tuple[slice, slice] | None:
    """The smallest (rows, cols) box holding every given box (None if there is none)."""
    found = [b for b in boxes if b is not None]
    if not found:
        return None
    return (
        slice(min(r.start for r, _ in found), max(r.stop for r, _ in found)),
        slice(min(c.start for _, c in found), max(c.stop for _, c in found)),
    )


def _interpolate_between(volume: npt.NDArray[np.float32], done: Sequence[int]) -> None:
    """Fill slices strictly between consecutive ``done`` indices linearly, in place."""
    for lo, hi in itertools.pairwise(done):
        for z in range(lo + 1, hi):
            w = np.float32((z - lo) / (hi - lo))
            volume[z] = (1 - w) * volume[lo] + w * volume[hi]


@dataclass(frozen=True)
class VolumeFusionSettings:
    """How :func:`fuse_volume` prepares the intensities and runs the network.

    ``strategy`` one of :data:`fusion_engine.inference.STRATEGIES`; ``device``, ``threads``
    and ``precision`` as in :func:`fusion_engine.inference.fuse`; ``batch_size`` slices per
    batch; ``ct_window`` (centre, width) in HU; ``mr_percentiles`` the MR's robust range.
    """

    strategy: str = DEFAULT_STRATEGY
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    mr_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES
    threads: int | None = None
    precision: str = "auto"


class VolumeFusionOverrides(TypedDict, total=False):
    """Keyword overrides of :class:`VolumeFusionSettings` accepted by :func:`fuse_volume`."""

    strategy: str
    device: str
    batch_size: int
    ct_window: tuple[float, float]
    mr_percentiles: tuple[float, float]
    threads: int | None
    precision: str


def _check_images(ct_hu: sitk.Image, mr_on_ct: sitk.Image, mr_mask: sitk.Image) -> None:
    for image, what in ((ct_hu, "CT"), (mr_on_ct, "MR"), (mr_mask, "MR mask")):
        if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
            raise InputError(f"{what} must be a 3-D SimpleITK image")
    if not (_same_grid(ct_hu, mr_on_ct) and _same_grid(ct_hu, mr_mask)):
        raise InputError("CT, MR and MR mask must share one grid (resample the MR first)")


@dataclass(frozen=True)
class _Volumes:
    """The input arrays (views) and the MR's intensity scale for the whole volume."""

    ct: npt.NDArray[np.floating]
    mr: npt.NDArray[np.floating]
    mask: npt.NDArray[np.bool_]
    lo: float
    hi: float

    def mr_unit(self, batch: list[int]) -> npt.NDArray[np.float32]:
        """MR of some slices scaled to [0, 1], 0 outside its data. Computed again per batch
        rather than kept for the whole volume (a few hundred ms in all against a
        volume-sized float array in memory)."""
        unit = np.clip((self.mr[batch].astype(np.float32) - self.lo) / (self.hi - self.lo), 0, 1)
        return np.where(self.mask[batch], np.nan_to_num(unit), 0.0).astype(np.float32)

    def box(self, with_mr: list[int]) -> tuple[slice, slice] | None:
        """One crop box for the whole volume: every batch has the same shape, so the freed
        activations of one batch fit the next (allocator.reuse_freed_memory) and no slice's
        result depends on which slices share its batch."""
        chunks = (with_mr[i : i + 16] for i in range(0, len(with_mr), 16))
        return _union_box(object_box(self.ct[c], self.mr_unit(c)) for c in chunks)


def _fuse_batches(
    vols: _Volumes,
    out: npt.NDArray[np.float32],
    with_mr: list[int],
    settings: VolumeFusionSettings,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Fuse the slices ``with_mr`` batch by batch into ``out`` (which holds the CT window)."""
    from fusion_engine.allocator import reuse_freed_memory
    from fusion_engine.inference import fuse  # torch is imported only when fusing

    box = vols.box(with_mr)
    total, step = len(with_mr), settings.batch_size
    if progress is not None:
        progress(0, total)
    with reuse_freed_memory():  # one page-in of the working set per volume, not per batch
        for start in range(0, total, step):
            batch = with_mr[start : start + step]
            ct_unit = out[batch]
            fused = ct_unit.copy()
            if box is not None:
                crop = (slice(None), *box)
                part = fuse(
                    np.ascontiguousarray(ct_unit[crop]),
                    np.ascontiguousarray(vols.mr_unit(batch)[crop]),
                    strategy=settings.strategy,
                    device=settings.device,
                    batch_size=step,
                    threads=settings.threads,
                    precision=settings.precision,
                )
                if part.shape != ct_unit[crop].shape:
                    raise InputError(
                        f"fuse returned shape {part.shape}, expected {ct_unit[crop].shape}"
                    )
                fused[crop] = part
            out[batch] = np.where(vols.mask[batch], np.clip(fused, 0.0, 1.0), ct_unit)
            if progress is not None:
                progress(min(start + step, total), total)


def fuse_volume(
    ct_hu: sitk.Image,
    mr_on_ct: sitk.Image,
    mr_mask: sitk.Image,
    settings: VolumeFusionSettings | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    slices: Sequence[int] | None = None,
    **overrides: Unpack[VolumeFusionOverrides],
) -> sitk.Image:
    """Fuse CT (HU) and MR (on the CT grid) axial slice by slice; float32 [0, 1] on the CT grid.

    ``mr_mask`` is 1 where the MR has data. Outside it the result is the CT-window image
    (see the module docstring). ``settings`` (default :class:`VolumeFusionSettings`), with any
    of its fields overridden by keyword (``strategy="average"``), say how to fuse.
    ``slices`` restricts the work to those z indices (a CT with gaps on a regular lattice: the
    real slices); slices between two of them are linearly interpolated from those two, slices
    outside their range hold the CT-window image. ``progress(done, total)`` is called after
    every batch.
    """
    settings = replace(settings or VolumeFusionSettings(), **overrides)
    _check_images(ct_hu, mr_on_ct, mr_mask)
    if settings.batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {settings.batch_size}")
    ct = sitk.GetArrayViewFromImage(ct_hu)
    mask = sitk.GetArrayViewFromImage(mr_mask) > 0
    depth = ct.shape[0]
    wanted = list(range(depth)) if slices is None else sorted({int(z) for z in slices})
    if any(z < 0 or z >= depth for z in wanted):
        raise InputError(f"slice indices must lie in 0..{depth - 1}")
    mr = sitk.GetArrayViewFromImage(mr_on_ct)
    lo, hi = mr_scale(mr, mask, settings.mr_percentiles) if mask.any() else (0.0, 1.0)
    out: npt.NDArray[np.float32] = np.empty(ct.shape, dtype=np.float32)
    for z in range(0, depth, 16):  # CT window everywhere first, in chunks (memory)
        out[z : z + 16] = ct_to_unit(ct[z : z + 16], settings.ct_window)
    with_mr = [z for z in wanted if mask[z].any()]
    _fuse_batches(_Volumes(ct, mr, mask, lo, hi), out, with_mr, settings, progress)
    if slices is not None:
        _interpolate_between(out, wanted)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(ct_hu)
    return result
