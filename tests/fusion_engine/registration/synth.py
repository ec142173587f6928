"""MR-like series synthesised from a real CT, for registration cases with a known truth.

A case's truth is an ITK-convention transform ``truth`` (CT point -> MR point). The MR-like
image lives on a grid defined in the MR's patient frame (axial, sagittal, coronal or oblique,
whole head or a slab), and its value at a grid point ``y`` is a tissue signal of the CT at
``truth^-1(y)``:

* *contrast*: a piecewise-linear, non-monotonic map from (median-filtered) CT numbers to an MR
  signal per tissue class: air, fat, water/CSF, brain-like soft tissue, muscle, marrow, cortical
  bone. T1-like: fat bright, CSF dark, cortical bone dark; T2-like: CSF brightest, fat bright,
  muscle dark; FLAIR-like: CSF suppressed, soft tissue bright.
* *thick slices*: every slice is the mean of sub-slices 1 mm or less apart across its
  thickness (a box slice profile), so partial volume is that of a 2-D multi-slice acquisition.
* *bias field*: a smooth random multiplicative field (cubic upsampling of a 4 x 4 x 4 lattice).
* *Rician noise*: the magnitude of the signal plus complex Gaussian noise.

The CT is median-filtered before the map (see :func:`clean_ct`) so that its own noise is not copied
into the MR-like image, which would make the two images more alike than real CT and MR are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

FloatArray = npt.NDArray[np.float64]

SUBSLICE_MM = 1.0
"""Largest distance between the sub-slices averaged into one thick slice."""

SIGNAL_SCALE = 1000.0
"""MR-like values are signal x this (a plausible MR pixel range)."""


@dataclass(frozen=True)
class Contrast:
    """A tissue contrast: MR signal (0-1) at CT numbers (HU), linear in between."""

    name: str
    hu: tuple[float, ...]
    signal: tuple[float, ...]


def _contrast(
    name: str, fat: float, water: float, soft: float, muscle: float, marrow: float
) -> Contrast:
    # air | air/fat edge | fat | fat/water edge | water | soft | muscle | marrow | cortical bone
    hu = (-1100.0, -450.0, -150.0, -60.0, 0.0, 15.0, 30.0, 45.0, 60.0, 90.0, 250.0, 500.0, 900.0)
    sig = (0.0, 0.0, fat, fat, water, water, soft, soft, muscle, muscle, marrow, marrow, 0.03)
    return Contrast(name, (*hu, 4000.0), (*sig, 0.03))


T1 = _contrast("T1", fat=1.0, water=0.12, soft=0.55, muscle=0.40, marrow=0.75)
T2 = _contrast("T2", fat=0.75, water=1.0, soft=0.45, muscle=0.22, marrow=0.55)
FLAIR = _contrast("FLAIR", fat=0.65, water=0.08, soft=0.60, muscle=0.30, marrow=0.45)
CONTRASTS = {c.name: c for c in (T1, T2, FLAIR)}


@dataclass(frozen=True)
class Grid:
    """An MR acquisition grid in the MR's patient frame.

    ``direction`` columns are the row, column and slice-normal directions; ``pixel_mm`` the
    in-plane spacing, ``slice_mm`` the slice thickness (= spacing), ``extent_mm`` the field of
    view along the three directions, ``center`` its centre (MR patient coordinates, mm).
    """

    direction: FloatArray
    pixel_mm: float
    slice_mm: float
    extent_mm: tuple[float, float, float]
    center: FloatArray

    def size(self) -> list[int]:
        """Voxels along the three directions."""
        spacing = (self.pixel_mm, self.pixel_mm, self.slice_mm)
        return [max(4, round(e / s)) for e, s in zip(self.extent_mm, spacing, strict=True)]

    def image(self, slice_step: float | None = None) -> sitk.Image:
        """An empty float32 image on this grid (slices ``slice_step`` apart if given)."""
        size = self.size()
        step = self.slice_mm if slice_step is None else slice_step
        if slice_step is not None:
            size[2] = round(size[2] * self.slice_mm / step)
        spacing = np.array([self.pixel_mm, self.pixel_mm, step])
        out = sitk.Image(size, sitk.sitkFloat32)
        out.SetSpacing([float(v) for v in spacing])
        out.SetDirection([float(v) for v in self.direction.ravel()])
        half = (np.array(size, dtype=np.float64) - 1.0) * spacing / 2.0
        out.SetOrigin([float(v) for v in self.center - self.direction @ half])
        return out


AXIAL = np.eye(3)
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
"""Rows along +y (posterior), columns along -z (down), normal -x: DICOM IOP 0/1/0/0/0/-1."""
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
"""Rows along +x, columns along -z, normal +y: DICOM IOP 1/0/0/0/0/-1."""
ORIENTATIONS = {"axial": AXIAL, "sagittal": SAGITTAL, "coronal": CORONAL}


def clean_ct(ct: sitk.Image) -> sitk.Image:
    """The CT as float32 with everything but the largest object (the head) set to air, and
    median-filtered (radius 1 voxel) so that its noise does not become MR texture.

    Support devices (table, container walls) are invisible on MR. A median keeps tissue edges
    sharp: a Gaussian would spread an air/tissue edge over CT numbers of fat, which every
    contrast would show as a bright rim that real MR does not have.
    """
    img = sitk.Cast(ct, sitk.sitkFloat32)
    img = sitk.Threshold(img, -1024.0, 1e9, -1000.0)
    mask = sitk.BinaryThreshold(img, -400.0, 1e9, 1, 0)
    radius = [max(1, round(1.5 / s)) for s in img.GetSpacing()]
    mask = sitk.BinaryMorphologicalOpening(mask, radius)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    head = sitk.BinaryDilate(sitk.Cast(labels == 1, sitk.sitkUInt8), [1, 1, 1])
    img = sitk.Mask(img, head, outsideValue=-1000.0)
    out: sitk.Image = sitk.Median(img, [1, 1, 1])
    return out


def tissue_signal(ct_clean: sitk.Image, contrast: Contrast) -> sitk.Image:
    """MR signal (0-1) of ``contrast`` on the CT grid, from :func:`clean_ct`'s output.

    The map is applied at the CT's resolution and the signal resampled afterwards, so partial
    volume mixes signals (as in MR), not CT numbers.
    """
    arr = sitk.GetArrayViewFromImage(ct_clean)
    out = sitk.GetImageFromArray(np.interp(arr, contrast.hu, contrast.signal).astype(np.float32))
    out.CopyInformation(ct_clean)
    return out


def bias_field(shape: tuple[int, ...], amplitude: float, rng: np.random.Generator) -> FloatArray:
    """Smooth multiplicative field with values in about 1 +- ``amplitude``."""
    coarse = rng.uniform(-1.0, 1.0, size=(4, 4, 4))
    zoom = [n / 4.0 for n in shape]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
    field = field / max(float(np.abs(field).max()), 1e-6)
    out: FloatArray = 1.0 + amplitude * field
    return out


def rician(signal: FloatArray, sigma: float, rng: np.random.Generator) -> FloatArray:
    """Magnitude of ``signal`` plus complex Gaussian noise of standard deviation ``sigma``."""
    real = signal + rng.normal(scale=sigma, size=signal.shape)
    imag = rng.normal(scale=sigma, size=signal.shape)
    out: FloatArray = np.hypot(real, imag)
    return out


def mr_like(
    signal: sitk.Image,
    truth: sitk.Transform,
    grid: Grid,
    *,
    bias: float = 0.2,
    noise: float = 0.04,
    seed: int = 0,
) -> sitk.Image:
    """An MR-like image on ``grid`` of the CT moved by ``truth`` (CT point -> MR point).

    ``noise`` is the Rician sigma as a fraction of the brightest signal (1), ``bias`` the
    amplitude of the bias field. ``signal`` comes from :func:`tissue_signal`.
    """
    rng = np.random.default_rng(seed)
    subs = max(1, math.ceil(grid.slice_mm / SUBSLICE_MM - 1e-9))
    fine = grid.image(slice_step=grid.slice_mm / subs)
    # Sub-slice centres: slice k covers [k - 1/2, k + 1/2] x thickness; the fine grid starts
    # half a thickness minus half a sub-step before the first slice centre.
    shift = (grid.slice_mm - grid.slice_mm / subs) / 2.0
    origin = np.array(grid.image().GetOrigin()) - grid.direction[:, 2] * shift
    fine.SetOrigin([float(v) for v in origin])
    moved = sitk.Resample(signal, fine, truth.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    n = grid.size()
    sig = sitk.GetArrayViewFromImage(moved).reshape(n[2], subs, n[1], n[0]).mean(axis=1)
    sig = sig * bias_field(sig.shape, bias, rng)
    sig = rician(sig, noise, rng) * SIGNAL_SCALE
    out = sitk.GetImageFromArray(sig.astype(np.float32))
    out.CopyInformation(grid.image())
    return out


def mirrored(image: sitk.Image) -> sitk.Image:
    """``image`` mirrored along its row direction (pixels flipped, header kept): an improper,
    left-right-flipped copy that no rigid transform can align with the original."""
    arr = sitk.GetArrayFromImage(image)[:, :, ::-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.CopyInformation(image)
    return out


def deformed(
    ct: sitk.Image, scale: tuple[float, float, float], warp_mm: float, seed: int
) -> sitk.Image:
    """Another subject made from the CT: scaled about its centre by ``scale`` (per axis) and
    warped by a smooth random displacement of up to about ``warp_mm``.

    Head size and shape differ this much between people; a rigid registration cannot align
    the result with the original, so it stands in for a series of the wrong patient.
    """
    rng = np.random.default_rng(seed)
    size = np.array(ct.GetSize(), dtype=np.float64)
    center = ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in (size - 1) / 2])
    scaling = sitk.ScaleTransform(3, [1.0 / s for s in scale])
    scaling.SetCenter([float(v) for v in center])
    mesh = [4, 4, 4]
    bspline = sitk.BSplineTransformInitializer(ct, mesh, 3)
    params = rng.uniform(-1.0, 1.0, size=len(bspline.GetParameters())) * warp_mm
    bspline.SetParameters([float(v) for v in params])
    warp = sitk.CompositeTransform(3)
    warp.AddTransform(scaling)
    warp.AddTransform(bspline)
    return sitk.Resample(ct, ct, warp, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)


def ellipsoid_head(grid: Grid, contrast: Contrast, *, seed: int = 0) -> sitk.Image:
    """A synthetic head on ``grid``: nested ellipsoids (scalp fat, skull, CSF, brain,
    ventricles) in ``contrast``, with bias field and Rician noise: a different subject."""
    rng = np.random.default_rng(seed)
    img = grid.image()
    size = img.GetSize()
    idx = np.stack(
        np.meshgrid(*(np.arange(n, dtype=np.float64) for n in size), indexing="ij"), axis=-1
    )
    a = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    pts = idx @ a.T + np.array(img.GetOrigin()) - grid.center
    radii = np.array([72.0, 90.0, 80.0])
    r = np.linalg.norm(pts / radii, axis=-1)
    hu = np.full(r.shape, -1000.0)
    for limit, value in ((1.0, -100.0), (0.95, 1200.0), (0.90, 8.0), (0.87, 38.0)):
        hu[r < limit] = value
    vent = np.linalg.norm(
        (pts - np.array([0.0, -10.0, 10.0])) / np.array([12.0, 30.0, 15.0]), axis=-1
    )
    hu[vent < 1.0] = 8.0
    sig = np.interp(hu, contrast.hu, contrast.signal).transpose(2, 1, 0)
    sig = sig * bias_field(sig.shape, 0.2, rng)
    sig = rician(sig, 0.04 * max(contrast.signal), rng) * SIGNAL_SCALE
    out = sitk.GetImageFromArray(sig.astype(np.float32))
    out.CopyInformation(img)
    return out
