"""The prepared CT/MR pair every stage works on: pyramids, head masks, sample sets.

Poses map MR points to CT points (``y = R @ x + t``): the MR is the sampling domain of every
metric (see :mod:`~fusion_engine.registration.similarity`), so the MR is ITK's *fixed* image
during optimisation and the result is inverted once at the end into the CT -> MR transform
that resampling and the DICOM REG object need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from fusion_engine.errors import RegistrationError
from fusion_engine.registration import geometry as geo
from fusion_engine.registration import masks
from fusion_engine.registration.geometry import FloatArray
from fusion_engine.registration.images import (
    LEVEL_SPACINGS_MM,
    Filters,
    Level,
    pyramid,
)
from fusion_engine.registration.similarity import (
    HISTOGRAM_BINS,
    Similarity,
    bin_image,
    quantile_edges,
)

CT_RANGE_HU = (-1000.0, 1500.0)
"""The CT is clipped to this range for every metric: padding (-2048) and metal would otherwise
squeeze soft tissue into a few histogram bins."""

MASK_LEVEL = 1
"""Index into :data:`LEVEL_SPACINGS_MM` of the level on which the head masks are made."""

SAMPLES_PER_LEVEL: tuple[int, ...] = (4000, 12000, 60000)
"""MR sample points of the metric per pyramid level. The finest level's optimum is the result:
its position varies by about 0.4 mm between independent sample sets of this size on the real
MRI-DIR pair (0.3 mm with 100,000, about 1 mm with 25,000; see docs/registration.md)."""

FINAL_LEVEL = len(LEVEL_SPACINGS_MM) - 1
"""The level whose metric defines the result (about 1 mm)."""

MASK_MARGIN_VOXELS = 1
"""The MR head mask is dilated by this many voxels (of the mask level) for sampling, so that
the head's outline, the strongest edge in both images, is inside the sample domain."""


@dataclass
class Pair:
    """A CT (moving during optimisation) and an MR (fixed), prepared for registration."""

    ct_image: sitk.Image
    mr_image: sitk.Image
    ct: list[Level]
    mr: list[Level]
    ct_mask: sitk.Image
    mr_mask: sitk.Image
    mr_sample_masks: list[sitk.Image]
    ct_center: FloatArray
    ct_axes: FloatArray
    mr_center: FloatArray
    mr_axes: FloatArray
    mr_cut: list[int]
    ct_cut: list[int]
    filters: Filters
    edges: tuple[FloatArray, FloatArray]
    _similarities: dict[tuple[int, int, int, int], Similarity] = field(default_factory=dict)
    _ct_bins: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)

    def similarity(
        self, level: int, count: int, seed: int = masks.SEED, bins: int = HISTOGRAM_BINS
    ) -> Similarity:
        """The metric on pyramid ``level`` with ``count`` MR samples drawn with ``seed``."""
        key = (level, count, seed, bins)
        if key not in self._similarities:
            mr, ct = self.mr[level], self.ct[level]
            sample_mask = self.mr_sample_masks[level]
            pts, idx = masks.voxel_points(sample_mask, count, seed)
            pts = pts + _jitter(mr.image, len(pts), seed)
            values = mr.array[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64)
            ct_bins = self._ct_bins.get(level)
            if ct_bins is None:
                ct_bins = self._ct_bins[level] = bin_image(ct.array, self.edges[1])
            self._similarities[key] = Similarity(
                pts, values, ct.image, ct_bins, self.edges[0], bins
            )
        return self._similarities[key]

    def level_similarity(self, level: int, seed: int = masks.SEED) -> Similarity:
        """The metric of ``level`` with its standard sample count."""
        return self.similarity(level, SAMPLES_PER_LEVEL[level], seed)

    def mr_points(self, count: int) -> FloatArray:
        """Up to ``count`` points (mm) of the MR head mask."""
        return masks.voxel_points(self.mr_mask, count)[0]

    def ct_points(self, count: int) -> FloatArray:
        """Up to ``count`` points (mm) of the CT head mask."""
        return masks.voxel_points(self.ct_mask, count)[0]


def _jitter(image: sitk.Image, count: int, seed: int) -> FloatArray:
    """Random offsets (mm) within a voxel of ``image`` for ``count`` sample points.

    An MR voxel value stands for its whole extent (a thick slice averages across it). Taking the
    CT at a random point of the voxel instead of its centre keeps the samples off a common
    lattice: with slices a multiple of the CT's slice spacing apart, centres would all fall at
    the same place between CT slices, and the interpolation would ripple the metric with the
    CT's period, giving false local optima a fraction of a millimetre apart.
    """
    a = geo.direction(image) @ np.diag(np.array(image.GetSpacing(), dtype=np.float64))
    rng = np.random.default_rng(seed + 1)
    out: FloatArray = rng.uniform(-0.5, 0.5, size=(count, 3)) @ a.T
    return out


def _clipped(image: sitk.Image, lo: float, hi: float, filters: Filters) -> sitk.Image:
    clamp = sitk.ClampImageFilter()
    clamp.SetLowerBound(lo)
    clamp.SetUpperBound(hi)
    clamp.SetOutputPixelType(sitk.sitkFloat32)
    return filters.run(clamp, image)


def prepare(ct: sitk.Image, mr: sitk.Image, filters: Filters) -> Pair:
    """Pyramids, head masks, centres and value ranges of a CT (HU) and an MR."""
    ct_clip = _clipped(ct, *CT_RANGE_HU, filters)
    mr_float = filters.cast(mr, sitk.sitkFloat32)
    mr_arr = sitk.GetArrayViewFromImage(mr_float)
    finite = mr_arr[np.isfinite(mr_arr)]
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        raise RegistrationError("MR image is constant; no head to register")
    mr_hi = float(np.percentile(finite, 99.9))
    mr_clip = _clipped(mr_float, float(finite.min()), mr_hi, filters)
    ct_levels = pyramid(ct_clip, filters)
    mr_levels = pyramid(mr_clip, filters)
    ct_mask = masks.head_mask(ct_levels[MASK_LEVEL], True, filters)
    mr_mask = masks.head_mask(mr_levels[MASK_LEVEL], False, filters)
    sample = masks.dilated(mr_mask, MASK_MARGIN_VOXELS, filters)
    sample_masks = [masks.mask_on(sample, lvl.image, filters) for lvl in mr_levels]
    ct_center, ct_axes = masks.moments(ct_mask)
    mr_center, mr_axes = masks.moments(mr_mask)
    ct_around = masks.dilated(ct_mask, 2 * MASK_MARGIN_VOXELS, filters)
    ct_values = ct_levels[MASK_LEVEL].array[sitk.GetArrayViewFromImage(ct_around) > 0]
    mr_values = mr_levels[MASK_LEVEL].array[sitk.GetArrayViewFromImage(sample) > 0]
    edges = (quantile_edges(mr_values), quantile_edges(ct_values))
    return Pair(
        ct_image=ct,
        mr_image=mr,
        ct=ct_levels,
        mr=mr_levels,
        ct_mask=ct_mask,
        mr_mask=mr_mask,
        mr_sample_masks=sample_masks,
        ct_center=ct_center,
        ct_axes=ct_axes,
        mr_center=mr_center,
        mr_axes=mr_axes,
        mr_cut=masks.cut_axes(mr_mask),
        ct_cut=masks.cut_axes(ct_mask),
        filters=filters,
        edges=edges,
    )


__all__ = ["LEVEL_SPACINGS_MM", "Pair", "prepare"]
