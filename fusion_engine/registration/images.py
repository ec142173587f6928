"""Images of the registration: input checks, SimpleITK filters with bounded threads, the
block-averaged pyramid, and resampling the MR onto the CT grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from fusion_engine.errors import InputError

LEVEL_SPACINGS_MM: tuple[float, ...] = (4.0, 2.0, 1.0)
"""Target voxel sizes of the pyramid levels, coarse to fine."""

INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
"""Interpolators :func:`resample_to` offers, by name."""


@dataclass
class Level:
    """One pyramid level of one image: the shrunk image and its numpy view."""

    image: sitk.Image
    array: npt.NDArray[np.float32]


class Filters:
    """SimpleITK filters run with a fixed number of threads (no global state touched)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def run(self, filt: Any, *images: sitk.Image) -> sitk.Image:
        """Execute the SimpleITK filter ``filt`` on ``images`` with this object's threads."""
        if self.threads is not None:
            filt.SetNumberOfThreads(self.threads)
        out: sitk.Image = filt.Execute(*images)
        return out

    def shrink(self, image: sitk.Image, factors: Sequence[int]) -> sitk.Image:
        """Block-average ``image`` by integer ``factors`` (origin kept physically right)."""
        if all(f == 1 for f in factors):
            return image
        filt = sitk.BinShrinkImageFilter()
        filt.SetShrinkFactors([int(f) for f in factors])
        return self.run(filt, image)

    def cast(self, image: sitk.Image, pixel_id: int) -> sitk.Image:
        """Cast ``image`` to ``pixel_id``."""
        if image.GetPixelID() == pixel_id:
            return image
        filt = sitk.CastImageFilter()
        filt.SetOutputPixelType(pixel_id)
        return self.run(filt, image)

    def resample(
        self,
        image: sitk.Image,
        reference: sitk.Image,
        transform: sitk.Transform,
        interpolator: int,
        default: float,
        pixel_id: int,
    ) -> sitk.Image:
        """Resample ``image`` onto ``reference``'s grid through ``transform``."""
        filt = sitk.ResampleImageFilter()
        filt.SetReferenceImage(reference)
        filt.SetTransform(transform)
        filt.SetInterpolator(interpolator)
        filt.SetDefaultPixelValue(default)
        filt.SetOutputPixelType(pixel_id)
        return self.run(filt, image)


def validate(image: sitk.Image, what: str) -> None:
    """Raise :class:`InputError` unless ``image`` is a 3-D scalar image big enough to register."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"{what} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"{what} must be 3-D, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a scalar image")
    if min(image.GetSize()) < 4:
        raise InputError(f"{what} is too small to register: size {image.GetSize()}")
    if min(image.GetSpacing()) <= 0:
        raise InputError(f"{what} has a non-positive spacing {image.GetSpacing()}")


def pyramid(image: sitk.Image, filters: Filters) -> list[Level]:
    """Block-averaged levels at about :data:`LEVEL_SPACINGS_MM`, coarse first."""
    levels: list[Level] = []
    current = image
    for target in reversed(LEVEL_SPACINGS_MM):
        factors = [max(1, round(target / s)) for s in current.GetSpacing()]
        factors = [min(f, max(1, n // 4)) for f, n in zip(factors, current.GetSize(), strict=True)]
        current = filters.shrink(current, factors)
        current = filters.cast(current, sitk.sitkFloat32)
        levels.append(Level(current, sitk.GetArrayViewFromImage(current)))
    return levels[::-1]


def resample_to(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    interpolator: str = "linear",
    default: float = 0.0,
) -> tuple[sitk.Image, sitk.Image]:
    """Resample ``moving`` onto ``fixed``'s grid through ``transform`` (fixed -> moving points).

    Returns the resampled image as float32 and a uint8 mask that is 1 where the moving image
    has data (the point maps inside its field of view) and 0 elsewhere, where the image holds
    ``default``. ``interpolator`` is ``"linear"`` or ``"bspline"`` (cubic B-spline).
    """
    if interpolator not in INTERPOLATORS:
        raise InputError(
            f"interpolator must be one of {sorted(INTERPOLATORS)}, got {interpolator!r}"
        )
    for image, what in ((fixed, "fixed"), (moving, "moving")):
        if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
            raise InputError(f"{what} must be a 3-D SimpleITK image")
    filters = Filters(None)
    src = filters.cast(moving, sitk.sitkFloat32)
    out = filters.resample(
        src, fixed, transform, INTERPOLATORS[interpolator], math.nan, sitk.sitkFloat32
    )
    mask = filters.run(sitk.EqualImageFilter(), out, out)  # NaN != NaN: 0 outside the data
    masker = sitk.MaskImageFilter()
    masker.SetOutsideValue(float(default))
    out = filters.run(masker, out, mask)
    return out, mask
