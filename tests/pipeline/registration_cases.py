"""Known-transform registration cases built from real data (shared by tests and benchmarks).

A case is a CT (fixed), a moving image and the true transform ``truth`` that maps CT points
onto moving points (ITK convention, like ``register``'s result). Moving images are either a
pseudo-MR made from the CT by a non-monotonic intensity map, or the real MR moved by a known
rigid transform on top of a reference registration. Error is measured as the mean target
registration error (TRE) over the 8 corners of the CT head's bounding box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

FloatArray = npt.NDArray[np.float64]

# HU -> pseudo-MR signal: air dark, fat brightest, soft tissue mid, bone dark (non-monotonic).
_HU_POINTS = (-1100.0, -600.0, -150.0, -60.0, 20.0, 60.0, 250.0, 800.0, 3000.0)
_MR_POINTS = (0.0, 40.0, 950.0, 900.0, 500.0, 620.0, 250.0, 60.0, 40.0)


@dataclass
class Case:
    """One known-transform case."""

    name: str
    fixed: sitk.Image
    moving: sitk.Image
    truth: sitk.Transform


def read_series(directory: Path) -> sitk.Image:
    """Read a DICOM series directory with SimpleITK (test/benchmark use only)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    return reader.Execute()


def rigid(
    angles_deg: tuple[float, float, float],
    translation_mm: tuple[float, float, float],
    center: tuple[float, float, float],
) -> sitk.Euler3DTransform:
    """Euler3D transform x -> R (x - c) + c + t with rotations about x, y, z in degrees."""
    tr = sitk.Euler3DTransform()
    tr.SetCenter(center)
    tr.SetRotation(*(math.radians(a) for a in angles_deg))
    tr.SetTranslation(translation_mm)
    return tr


def random_rigid(
    rng: np.random.Generator, max_deg: float, max_mm: float, center: tuple[float, float, float]
) -> sitk.Euler3DTransform:
    """A rigid transform with a random axis, angle up to ``max_deg`` and shift up to ``max_mm``."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.5, 1.0) * max_deg)
    shift = rng.normal(size=3)
    shift *= rng.uniform(0.5, 1.0) * max_mm / np.linalg.norm(shift)
    versor = sitk.VersorRigid3DTransform()
    versor.SetCenter(center)
    versor.SetRotation([float(v) for v in axis], angle)
    versor.SetTranslation([float(v) for v in shift])
    tr = sitk.Euler3DTransform()
    tr.SetCenter(center)
    tr.SetMatrix(versor.GetMatrix())
    tr.SetTranslation(versor.GetTranslation())
    return tr


def head_box_corners(ct: sitk.Image) -> FloatArray:
    """The 8 corners (mm, LPS) of the bounding box of the largest object above -400 HU."""
    factors = [max(1, round(2.0 / s)) for s in ct.GetSpacing()]
    small = sitk.BinShrink(ct, factors)
    mask = sitk.BinaryThreshold(small, -400.0, 1e9, 1, 0)
    mask = sitk.BinaryMorphologicalOpening(mask, [1, 1, 1])
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    corners = []
    for i in (x, x + sx - 1):
        for j in (y, y + sy - 1):
            for k in (z, z + sz - 1):
                corners.append(small.TransformIndexToPhysicalPoint((i, j, k)))
    return np.array(corners, dtype=np.float64)


def tre_mm(estimate: sitk.Transform, truth: sitk.Transform, points: FloatArray) -> float:
    """Mean distance between where ``estimate`` and ``truth`` send ``points``."""
    d = [
        np.linalg.norm(
            np.array(estimate.TransformPoint([float(v) for v in p]))
            - np.array(truth.TransformPoint([float(v) for v in p]))
        )
        for p in points
    ]
    return float(np.mean(d))


def mr_like_grid(
    center: FloatArray, spacing: tuple[float, float, float], extent_mm: tuple[float, float, float]
) -> sitk.Image:
    """An empty axial grid (identity direction) of ``extent_mm`` centred on ``center``."""
    size = [max(4, round(e / s)) for e, s in zip(extent_mm, spacing, strict=True)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    half = np.array([(n - 1) * s / 2.0 for n, s in zip(size, spacing, strict=True)])
    grid.SetOrigin([float(v) for v in np.asarray(center) - half])
    return grid


def pseudo_mr(
    ct: sitk.Image,
    truth: sitk.Transform,
    grid: sitk.Image,
    *,
    noise: float = 0.03,
    seed: int = 0,
) -> sitk.Image:
    """Pseudo-MR on ``grid`` such that pseudo(truth(x)) = f(ct(x)), f non-monotonic in HU.

    Adds a smooth multiplicative bias field and Gaussian noise (fraction ``noise`` of the
    maximum signal) so that the intensity relation is not exact.
    """
    hu = sitk.Resample(
        sitk.Cast(ct, sitk.sitkFloat32),
        grid,
        truth.GetInverse(),
        sitk.sitkLinear,
        -1000.0,
        sitk.sitkFloat32,
    )
    arr = sitk.GetArrayFromImage(hu)
    sig = np.interp(arr, _HU_POINTS, _MR_POINTS).astype(np.float32)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in arr.shape), indexing="ij")
    sig *= (1.0 + 0.15 * xx - 0.1 * yy + 0.1 * zz * zz).astype(np.float32)
    rng = np.random.default_rng(seed)
    sig += rng.normal(scale=noise * max(_MR_POINTS), size=sig.shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip(sig, 0.0, None).astype(np.float32))
    out.CopyInformation(grid)
    return out


def moved_image(image: sitk.Image, shift: sitk.Transform) -> sitk.Image:
    """``image`` re-sampled so that moved(y) = image(shift(y)) on the same grid."""
    return sitk.Resample(image, image, shift, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def moved_header(image: sitk.Image, move: sitk.Transform) -> sitk.Image:
    """``image`` rigidly moved by rewriting its geometry, without resampling.

    The pixels stay as they are; a voxel that sat at physical point p sits at ``move(p)``
    afterwards (origin and direction change, ``move`` must be rigid). So the known transform of
    a registration to the moved image is exact: CT x -> ``move(reference(x))``.
    """
    a = np.array(move.TransformPoint((0.0, 0.0, 0.0)))
    m = np.stack([np.array(move.TransformPoint(tuple(e))) - a for e in np.eye(3)], axis=1)
    direction = m @ np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(move.TransformPoint(image.GetOrigin()))
    out = sitk.Image(image)
    out.SetDirection([float(v) for v in direction.ravel()])
    out.SetOrigin([float(v) for v in origin])
    return out


def compose(first: sitk.Transform, then: sitk.Transform) -> sitk.Transform:
    """The transform x -> then(first(x))."""
    out = sitk.CompositeTransform(3)
    out.AddTransform(then)
    out.AddTransform(first)
    return out


def box_center(ct: sitk.Image) -> tuple[float, float, float]:
    """Centre (mm) of the CT head box."""
    c = head_box_corners(ct).mean(axis=0)
    return (float(c[0]), float(c[1]), float(c[2]))


def flip_about_y(center: tuple[float, float, float]) -> sitk.Euler3DTransform:
    """180 degrees about the anterior-posterior axis: the feet-first/head-first confusion."""
    return rigid((0.0, 180.0, 0.0), (0.0, 0.0, 0.0), center)
