"""Rigid MR -> CT registration, resampling onto the CT grid, and the DICOM REG matrix.

The CT is the fixed image, the MR the moving one. The result is an ITK rigid transform
(``VersorRigid3DTransform``) that maps CT (fixed) physical points onto MR (moving) points, the
convention ``sitk.Resample`` expects. :func:`reg_matrix_mr_to_ct` is the one place that turns it
into the DICOM Frame of Reference Transformation Matrix, which maps the other way.

How :func:`register` works (see ``docs/registration.md``):

1. Both images are shrunk by block averaging (``BinShrink``) to a pyramid of about 1, 2 and
   4 mm; the full-resolution images are never filtered.
2. Head masks at about 2 mm: Otsu threshold (CT clipped to >= -1024 HU first), opening,
   largest connected component, closing, hole filling.
3. Global search at about 4 mm: candidate rotations are the 24 axis-aligned orientations
   (whole-body reorientations such as feet-first vs head-first), each also tilted by +-25
   degrees about every axis, the four principal-axes (moments) alignments of the two masks and
   the header geometry (identity). Each candidate is translated so that the mask centres
   meet (and slid along any axis where one image cuts the head, e.g. an MR slab) and scored
   by mutual information on a few thousand points of the CT mask.
4. The best distinct candidates are refined with Mattes mutual information (regular-step
   gradient descent) at 4 mm; the best of them is refined at 2 mm and at about 1 mm. Each level
   is rerun while the pose still moves.
5. Quality: final metric, Dice of the head masks inside the MR's field of view, the angle
   between the result and what the headers imply. Unreliable results raise
   :class:`~fusion_engine.errors.RegistrationError` carrying the quality report.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from fusion_engine.errors import InputError, RegistrationError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

WARN_ANGLE_DEG = 45.0
"""A result further than this from the header geometry gets a warning for the planner."""

MIN_MASK_DICE = 0.80
"""Head-mask Dice (inside the MR's field of view) below this marks a result unreliable."""

MAX_METRIC_VALUE = -0.15
"""Mattes metric (negative mutual information) above this marks a result unreliable."""

MIN_OVERLAP = 0.30
"""Fraction of the CT head mask that must map into the MR's field of view."""

LEVEL_SPACINGS_MM: tuple[float, ...] = (4.0, 2.0, 1.0)
"""Target voxel sizes of the pyramid levels, coarse to fine."""

MASK_LEVEL = 1
"""Index into :data:`LEVEL_SPACINGS_MM` of the level on which the head masks are made."""

SEARCH_TILT_DEG = 25.0
"""Tilt added to each axis-aligned orientation in the global search."""

SEARCH_POINTS = 4000
"""CT mask points used to score a candidate in the global search."""

SLIDE_MIN_MM = 15.0
"""Extent difference (half of it) of the head masks along an MR axis that triggers slides."""

SLIDE_STEP_MM = 12.0
"""Step of the slides along an MR axis in the global search."""

SLIDE_MAX_STEPS = 5
"""At most this many slide steps each way (+-60 mm)."""

POLISH_CANDIDATES = 24
"""How many of the best distinct search poses get a quick coordinate search before ranking."""

POLISH_DEG = 8.0
POLISH_MM = 8.0
POLISH_ROUNDS = 3
"""First step sizes and number of rounds (steps halve each round) of that coordinate search."""

REFINE_CANDIDATES = 6
"""How many of the best search candidates are refined at the coarsest level."""

DISTINCT_DEG = 20.0
DISTINCT_MM = 15.0
"""Search candidates closer than this (rotation and shift) to a better one are not refined."""

SAMPLES_PER_LEVEL: tuple[int, ...] = (6000, 15000, 30000)
"""Mattes MI sample points per level (random, fixed seed, inside the dilated CT mask)."""

ITERATIONS_PER_LEVEL: tuple[int, ...] = (80, 60, 40)
"""Maximum optimizer iterations per level."""

MAX_RESTARTS = 3
"""Extra optimizer runs on a level while the pose still moves (see :func:`_refine_level`)."""

RESTART_MOVED_FRACTION = 0.5
"""A level is rerun when its last run moved the head by more than this x the level's voxel."""

RESTART_MIN_GAIN = 0.005
"""...and only while the last run improved the metric by at least this much (nats)."""

HISTOGRAM_BINS = 32
"""Mattes MI histogram bins."""

RELAXATION = 0.6
"""Regular-step gradient descent: step shrink factor when the gradient direction turns."""

MIN_STEP_FRACTION = 0.01
"""Regular-step gradient descent stops when its step is below this fraction of the level's
voxel size (in millimetres of physical shift)."""

_SEED = 20231
_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


@dataclass
class RegistrationQuality:
    """How good a registration looks; the node shows it and fails the job when it is poor.

    ``metric_value`` is the final Mattes metric as ITK reports it (negative mutual information,
    lower is better). ``mask_dice`` is the Dice overlap of the CT and MR head masks after
    registration, counted inside the MR's field of view. ``angle_from_header_deg`` is the
    rotation angle between the result and the identity the DICOM headers imply.
    """

    metric_value: float
    mask_dice: float
    iterations: int
    seconds: float
    angle_from_header_deg: float
    warnings: list[str] = field(default_factory=list)


@dataclass
class RegistrationResult:
    """A rigid transform mapping CT (fixed) points to MR (moving) points, and its quality."""

    transform: sitk.Transform
    quality: RegistrationQuality


@dataclass
class _Level:
    """One pyramid level of one image: the shrunk image and its numpy view."""

    image: sitk.Image
    array: npt.NDArray[np.float32]


class _Filters:
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


# ----------------------------------------------------------------------------- geometry


def _direction(image: sitk.Image) -> FloatArray:
    return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def _index_to_physical(image: sitk.Image) -> tuple[FloatArray, FloatArray]:
    """Matrix A and offset o with physical = A @ (i, j, k) + o (ITK index order x, y, z)."""
    a = _direction(image) @ np.diag(np.array(image.GetSpacing(), dtype=np.float64))
    return a, np.array(image.GetOrigin(), dtype=np.float64)


def _affine_of(transform: sitk.Transform) -> tuple[FloatArray, FloatArray]:
    """Matrix A and offset b with transform(x) = A @ x + b, checked to be affine."""
    if not isinstance(transform, sitk.Transform) or transform.GetDimension() != 3:
        raise InputError("expected a 3-D SimpleITK transform")
    if not transform.IsLinear():
        raise InputError(
            f"transform {transform.GetName()} is not affine; no DICOM REG matrix exists"
        )
    basis = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    try:
        mapped = [np.array(transform.TransformPoint(p), dtype=np.float64) for p in basis]
    except RuntimeError as exc:
        raise InputError(f"transform cannot map 3-D points: {exc}") from exc
    b = mapped[0]
    a = np.stack([mapped[i] - b for i in (1, 2, 3)], axis=1)
    # An affine transform maps any point like the matrix does: check a few far points.
    for p in ((137.0, -251.0, 89.0), (-300.0, 40.0, -170.0), (55.5, 310.0, 420.0)):
        got = np.array(transform.TransformPoint(p), dtype=np.float64)
        want = a @ np.array(p) + b
        if not np.allclose(got, want, atol=1e-4 * (1.0 + float(np.abs(want).max()))):
            raise InputError(
                f"transform {transform.GetName()} is not affine; no DICOM REG matrix exists"
            )
    return a, b


def _rigid(matrix: FloatArray, center: FloatArray, translation: FloatArray) -> sitk.Transform:
    """VersorRigid3DTransform x -> R (x - c) + c + t."""
    tr = sitk.VersorRigid3DTransform()
    tr.SetCenter([float(v) for v in center])
    tr.SetMatrix([float(v) for v in _orthonormalize(matrix).ravel()])
    tr.SetTranslation([float(v) for v in translation])
    return tr


def _orthonormalize(matrix: FloatArray) -> FloatArray:
    u, _, vt = np.linalg.svd(matrix)
    r: FloatArray = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1.0
        r = u @ vt
    return r


def _rotation_angle_deg(matrix: FloatArray) -> float:
    """Rotation angle (degrees) of the rotation closest to ``matrix``."""
    r = _orthonormalize(matrix)
    cos = (float(np.trace(r)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _axis_name(matrix: FloatArray) -> str:
    """Patient axis (LPS) closest to the rotation axis of ``matrix``."""
    values, vectors = np.linalg.eig(_orthonormalize(matrix))
    axis = np.real(vectors[:, int(np.argmin(np.abs(values - 1.0)))])
    return ("left-right", "anterior-posterior", "head-feet")[int(np.argmax(np.abs(axis)))]


def _axis_rotation(axis: int, degrees: float) -> FloatArray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _cube_rotations() -> list[FloatArray]:
    """The 24 proper rotations that map coordinate axes onto coordinate axes."""
    out: list[FloatArray] = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            for row, (col, sign) in enumerate(zip(perm, signs, strict=True)):
                m[row, col] = sign
            if np.linalg.det(m) > 0:
                out.append(m)
    return out


# ----------------------------------------------------------------------------- pyramid, masks


def _validate(image: sitk.Image, what: str) -> None:
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


def _pyramid(image: sitk.Image, filters: _Filters) -> list[_Level]:
    """Block-averaged levels at about :data:`LEVEL_SPACINGS_MM`, coarse first."""
    levels: list[_Level] = []
    current = image
    for target in reversed(LEVEL_SPACINGS_MM):
        factors = [max(1, round(target / s)) for s in current.GetSpacing()]
        factors = [min(f, max(1, n // 4)) for f, n in zip(factors, current.GetSize(), strict=True)]
        current = filters.shrink(current, factors)
        current = filters.cast(current, sitk.sitkFloat32)
        levels.append(_Level(current, sitk.GetArrayViewFromImage(current)))
    return levels[::-1]


def _head_mask(level: _Level, is_ct: bool, filters: _Filters) -> sitk.Image:
    """Largest bright connected object (Otsu), closed and hole-filled, as uint8 0/1."""
    arr = level.array
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        raise RegistrationError("image has no finite values")
    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    if is_ct:
        lo = max(lo, -1024.0)
    if hi <= lo:
        raise RegistrationError("image is constant; no head to register")
    clipped = sitk.GetImageFromArray(np.clip(np.nan_to_num(arr, nan=lo), lo, hi))
    clipped.CopyInformation(level.image)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.SetNumberOfHistogramBins(128)
    mask = filters.run(otsu, clipped)
    opening = sitk.BinaryMorphologicalOpeningImageFilter()
    opening.SetKernelRadius(1)
    opening.SetForegroundValue(1)
    mask = filters.run(opening, mask)
    labels = filters.run(sitk.ConnectedComponentImageFilter(), mask)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetSortByObjectSize(True)
    labels = filters.run(relabel, labels)
    if relabel.GetNumberOfObjects() == 0:
        raise RegistrationError("no object found above the Otsu threshold")
    largest = sitk.GetArrayFromImage(labels) == 1
    # Edge padding: closing must not erode the mask where the field of view cuts the head.
    pad = 2
    padded = np.pad(largest, pad, mode="edge")
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3, 3)), iterations=pad)
    largest = closed[pad:-pad, pad:-pad, pad:-pad]
    largest = ndimage.binary_fill_holes(largest)
    # Slice-wise filling too: a slab that cuts through the head leaves open "holes".
    for k in range(largest.shape[0]):
        largest[k] = ndimage.binary_fill_holes(largest[k])
    out = sitk.GetImageFromArray(largest.astype(np.uint8))
    out.CopyInformation(level.image)
    return out


def _mask_on(mask: sitk.Image, reference: sitk.Image, filters: _Filters) -> sitk.Image:
    """A mask resampled (nearest neighbour) onto another level's grid of the same image."""
    return filters.resample(
        mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8
    )


def _mask_points(mask: sitk.Image, count: int) -> FloatArray:
    """Physical coordinates (mm) of at most ``count`` voxels of a mask (fixed subsample)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)
    if idx.shape[0] > count:
        idx = idx[np.random.default_rng(_SEED).choice(idx.shape[0], count, replace=False)]
    a, o = _index_to_physical(mask)
    pts: FloatArray = idx @ a.T + o
    return pts


def _moments(mask: sitk.Image) -> tuple[FloatArray, FloatArray]:
    """Centre (mm) and principal axes (columns, by decreasing variance) of a mask."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)
    if idx.shape[0] < 10:
        raise RegistrationError("head mask is empty")
    a, o = _index_to_physical(mask)
    pts = idx @ a.T + o
    center = pts.mean(axis=0)
    cov = np.cov((pts - center).T)
    _, vecs = np.linalg.eigh(cov)
    axes: FloatArray = vecs[:, ::-1]
    return center, axes


# ----------------------------------------------------------------------------- global search


class _SearchScorer:
    """Mutual information of CT mask points against the MR, for many candidate poses."""

    bins = 24

    def __init__(self, fixed: _Level, fixed_mask: sitk.Image, moving: _Level) -> None:
        idx = np.argwhere(sitk.GetArrayViewFromImage(fixed_mask) > 0)
        rng = np.random.default_rng(_SEED)
        if idx.shape[0] > SEARCH_POINTS:
            idx = idx[rng.choice(idx.shape[0], SEARCH_POINTS, replace=False)]
        values = fixed.array[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64)
        a, o = _index_to_physical(fixed.image)
        self.points = idx[:, ::-1].astype(np.float64) @ a.T + o
        self.fixed_bins = self._quantize(values, self._range(values))
        ma, mo = _index_to_physical(moving.image)
        self.phys_to_index = np.linalg.inv(ma)
        self.moving_origin = mo
        self.moving = np.nan_to_num(moving.array.astype(np.float32))
        self.moving_range = self._range(self.moving.ravel().astype(np.float64))
        self.shape = np.array(self.moving.shape, dtype=np.float64)[:, None]

    @staticmethod
    def _range(values: FloatArray) -> tuple[float, float]:
        lo, hi = np.percentile(values, (1.0, 99.0))
        return float(lo), max(float(hi), float(lo) + 1e-6)

    def _quantize(self, values: FloatArray, value_range: tuple[float, float]) -> IntArray:
        lo, hi = value_range
        scaled = np.round((values - lo) / (hi - lo) * (self.bins - 1))
        out: IntArray = np.clip(scaled, 0, self.bins - 1).astype(np.int64)
        return out

    def score(self, matrix: FloatArray, offset: FloatArray) -> float:
        """MI (nats) x overlap fraction of the pose y = matrix @ x + offset."""
        moved = self.points @ matrix.T + offset
        coords = ((moved - self.moving_origin) @ self.phys_to_index.T)[:, ::-1].T  # z, y, x
        inside = np.all((coords >= -0.5) & (coords <= self.shape - 0.5), axis=0)
        frac = float(inside.mean())
        if frac < MIN_OVERLAP:
            return 0.0
        vals = ndimage.map_coordinates(self.moving, coords[:, inside], order=1, mode="nearest")
        mb = self._quantize(vals.astype(np.float64), self.moving_range)
        joint = np.bincount(self.fixed_bins[inside] * self.bins + mb, minlength=self.bins**2)
        p = joint.reshape(self.bins, self.bins) / float(joint.sum())
        px, py = p.sum(axis=1), p.sum(axis=0)
        nz = p > 0
        mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(px, py)[nz])))
        return mi * frac


def _cut_axes(mask: sitk.Image) -> list[int]:
    """Axes (x, y, z index order) along which the head mask touches the end of the image."""
    arr = sitk.GetArrayViewFromImage(mask) > 0
    cut = []
    for axis in range(3):
        np_axis = 2 - axis
        first = np.take(arr, 0, axis=np_axis).sum()
        last = np.take(arr, arr.shape[np_axis] - 1, axis=np_axis).sum()
        if max(int(first), int(last)) >= 10:
            cut.append(axis)
    return cut


def _slides(
    matrix: FloatArray,
    offset: FloatArray,
    fixed_points: FloatArray,
    moving_points: FloatArray,
    directions: list[tuple[FloatArray, bool]],
) -> list[FloatArray]:
    """Extra shifts (MR mm) for a pose when one image covers only part of the head.

    Matching mask centres is wrong when, say, the MR is a slab through part of the head. Of the
    axes along which one image cuts the head (``directions``: unit vectors, in MR space when
    the flag is true, else CT axes), the one where the other image's mask is longest by more
    than 2 x :data:`SLIDE_MIN_MM` is used: the pose is also tried shifted along it in steps of
    :data:`SLIDE_STEP_MM` over half the difference (at most :data:`SLIDE_MAX_STEPS` each way).
    """
    mapped = fixed_points @ matrix.T + offset
    best_axis: FloatArray | None = None
    best_slack = SLIDE_MIN_MM
    for direction, in_mr in directions:
        axis = direction if in_mr else matrix @ direction
        diff = float(np.ptp(mapped @ axis)) - float(np.ptp(moving_points @ axis))
        slack = diff / 2.0 if in_mr else -diff / 2.0
        if slack > best_slack:
            best_axis, best_slack = axis, slack
    if best_axis is None:
        return [np.zeros(3)]
    n = min(SLIDE_MAX_STEPS, int((best_slack + SLIDE_STEP_MM / 2.0) // SLIDE_STEP_MM))
    return [k * SLIDE_STEP_MM * best_axis for k in range(-n, n + 1)]


def _polish(
    scorer: _SearchScorer, matrix: FloatArray, offset: FloatArray, center: FloatArray
) -> tuple[float, FloatArray, FloatArray]:
    """Greedy coordinate search of a pose (rotations about ``center``, shifts) on the scorer.

    Steps start at :data:`POLISH_DEG` / :data:`POLISH_MM` and halve each round, so a candidate
    from the coarse grid of orientations comes within a few degrees and millimetres of the
    basin it lies in before the candidates are ranked.
    """
    best = scorer.score(matrix, offset)
    r, off = matrix, offset
    deg, mm = POLISH_DEG, POLISH_MM
    for _ in range(POLISH_ROUNDS):
        for axis in range(3):
            for sign in (1.0, -1.0):
                turn = _axis_rotation(axis, sign * deg)
                # Rotate about the CT centre: y = R (turn (x - c) + c) + off.
                r_new = r @ turn
                off_new = off + r @ (center - turn @ center)
                value = scorer.score(r_new, off_new)
                if value > best:
                    best, r, off = value, r_new, off_new
                    break
            for sign in (1.0, -1.0):
                shift = np.zeros(3)
                shift[axis] = sign * mm
                value = scorer.score(r, off + shift)
                if value > best:
                    best, off = value, off + shift
                    break
        deg, mm = deg / 2.0, mm / 2.0
    return best, r, off


def _candidates(
    fixed_center: FloatArray,
    fixed_axes: FloatArray,
    moving_center: FloatArray,
    moving_axes: FloatArray,
) -> list[tuple[str, FloatArray, FloatArray]]:
    """(label, R, offset) poses y = R x + offset for the global search."""
    out: list[tuple[str, FloatArray, FloatArray]] = [("header", np.eye(3), np.zeros(3))]

    def centred(r: FloatArray) -> FloatArray:
        off: FloatArray = moving_center - r @ fixed_center
        return off

    tilts = [np.eye(3)] + [
        _axis_rotation(ax, sgn * SEARCH_TILT_DEG) for ax in range(3) for sgn in (1.0, -1.0)
    ]
    for ci, cube in enumerate(_cube_rotations()):
        for ti, tilt in enumerate(tilts):
            r = tilt @ cube
            out.append((f"axes{ci}.{ti}", r, centred(r)))
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
        r = moving_axes @ np.diag(np.array(signs, dtype=np.float64)) @ fixed_axes.T
        if np.linalg.det(r) < 0:
            r = moving_axes @ np.diag(-np.array(signs, dtype=np.float64)) @ fixed_axes.T
        out.append((f"moments{signs}", r, centred(r)))
    return out


def _distinct(
    scored: list[tuple[float, str, FloatArray, FloatArray]], count: int
) -> list[tuple[float, str, FloatArray, FloatArray]]:
    """The best ``count`` poses, skipping poses close to a better one already taken."""
    taken: list[tuple[float, str, FloatArray, FloatArray]] = []
    for cand in scored:
        _, _, r, off = cand
        close = any(
            _rotation_angle_deg(r @ t[2].T) < DISTINCT_DEG
            and float(np.linalg.norm(off - t[3])) < DISTINCT_MM
            for t in taken
        )
        if not close:
            taken.append(cand)
        if len(taken) == count:
            break
    return taken


# ----------------------------------------------------------------------------- local refinement


@dataclass
class _Refined:
    transform: sitk.Transform
    metric: float
    iterations: int
    stop: str


def _refine(
    fixed: _Level,
    fixed_mask: sitk.Image,
    moving: _Level,
    initial: sitk.Transform,
    center: FloatArray,
    level: int,
    threads: int | None,
) -> _Refined:
    """Mattes-MI rigid refinement on one pyramid level."""
    reg = sitk.ImageRegistrationMethod()
    if threads is not None:
        reg.SetNumberOfThreads(threads)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    reg.SetMetricFixedMask(fixed_mask)
    mask_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)))
    # ITK draws pct * (all voxels) random points and drops those outside the mask.
    pct = min(1.0, SAMPLES_PER_LEVEL[level] / max(mask_voxels, 1))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(pct, _SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    step = LEVEL_SPACINGS_MM[level]
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step,
        minStep=MIN_STEP_FRACTION * step,
        numberOfIterations=ITERATIONS_PER_LEVEL[level],
        relaxationFactor=RELAXATION,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    # The optimised transform stays near identity, composed after the fixed initial pose:
    # VersorRigid3D's Jacobian divides by the versor's w, which vanishes near 180 degrees.
    reg.SetMovingInitialTransform(initial)
    step_tr = sitk.VersorRigid3DTransform()
    step_tr.SetCenter([float(v) for v in center])
    reg.SetInitialTransform(step_tr, inPlace=True)
    try:
        reg.Execute(fixed.image, moving.image)
    except RuntimeError as exc:
        raise RegistrationError(f"optimizer failed at level {level}: {exc}") from exc
    metric = float(reg.GetMetricValue())
    a, b = _affine_of(_then(step_tr, initial))
    return _Refined(
        _rigid(a, center, a @ center + b - center),
        metric,
        int(reg.GetOptimizerIteration()),
        reg.GetOptimizerStopConditionDescription(),
    )


def _refine_level(
    fixed: list[_Level],
    masks: list[sitk.Image],
    moving: list[_Level],
    initial: sitk.Transform,
    center: FloatArray,
    level: int,
    threads: int | None,
    points: FloatArray,
) -> _Refined:
    """:func:`_refine` on one level, restarted (fresh step length) while the pose still moves.

    Regular-step descent shrinks its step at every turn of the gradient and cannot grow it
    again, so in a long shallow valley (e.g. an MR slab sliding along the head) it stalls far
    from the optimum; a restart costs little when the pose has already converged.
    """
    total = 0
    current = initial
    result: _Refined | None = None
    for _ in range(1 + MAX_RESTARTS):
        previous = result
        result = _refine(fixed[level], masks[level], moving[level], current, center, level, threads)
        total += result.iterations
        moved = _mean_displacement(current, result.transform, points)
        current = result.transform
        gain = (previous.metric - result.metric) if previous is not None else math.inf
        if moved < RESTART_MOVED_FRACTION * LEVEL_SPACINGS_MM[level] or gain < RESTART_MIN_GAIN:
            break
    if result is None:
        raise RegistrationError("no refinement ran")
    result.iterations = total
    return result


def _mean_displacement(a: sitk.Transform, b: sitk.Transform, points: FloatArray) -> float:
    """Mean distance (mm) between where two affine transforms send ``points``."""
    ma, oa = _affine_of(a)
    mb, ob = _affine_of(b)
    diff = points @ (ma - mb).T + (oa - ob)
    return float(np.linalg.norm(diff, axis=1).mean())


def _then(first: sitk.Transform, second: sitk.Transform) -> sitk.Transform:
    """x -> second(first(x))."""
    out = sitk.CompositeTransform(3)
    out.AddTransform(second)
    out.AddTransform(first)
    return out


# ----------------------------------------------------------------------------- quality


def _mask_dice(
    fixed_mask: sitk.Image, moving_mask: sitk.Image, transform: sitk.Transform, filters: _Filters
) -> tuple[float, float]:
    """(Dice of the masks inside the MR field of view, fraction of CT mask inside that view)."""
    moved = filters.resample(
        moving_mask, fixed_mask, transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8
    )
    ones = sitk.Image(moving_mask.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving_mask)
    fov = filters.resample(
        ones, fixed_mask, transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8
    )
    f = sitk.GetArrayViewFromImage(fixed_mask) > 0
    m = sitk.GetArrayViewFromImage(moved) > 0
    v = sitk.GetArrayViewFromImage(fov) > 0
    fv = f & v
    denom = int(fv.sum()) + int((m & v).sum())
    dice = 2.0 * int((fv & m).sum()) / denom if denom else 0.0
    overlap = float(fv.sum()) / max(int(f.sum()), 1)
    return dice, overlap


# ----------------------------------------------------------------------------- public API


def register(
    fixed_ct: sitk.Image,
    moving_mr: sitk.Image,
    *,
    threads: int | None = None,
    accept_unreliable: bool = False,
) -> RegistrationResult:
    """Rigidly register the MR (moving) onto the CT (fixed).

    Returns the transform (CT points -> MR points, ITK convention) and its quality. Raises
    :class:`RegistrationError` (with ``.quality`` set) when the result looks unreliable, unless
    ``accept_unreliable`` is true, in which case the reasons are added to the warnings.
    ``threads`` bounds the SimpleITK threads (``None``: SimpleITK's default).
    """
    _validate(fixed_ct, "fixed CT")
    _validate(moving_mr, "moving MR")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    t0 = time.perf_counter()
    filters = _Filters(threads)
    fixed = _pyramid(fixed_ct, filters)
    moving = _pyramid(moving_mr, filters)
    fixed_mask = _head_mask(fixed[MASK_LEVEL], True, filters)
    moving_mask = _head_mask(moving[MASK_LEVEL], False, filters)
    fixed_center, fixed_axes = _moments(fixed_mask)
    moving_center, moving_axes = _moments(moving_mask)
    t_prep = time.perf_counter()

    # Metric masks: the CT head, dilated by a few mm so the edge information counts.
    dilate = sitk.BinaryDilateImageFilter()
    dilate.SetKernelRadius(2)
    dilate.SetForegroundValue(1)
    metric_mask = filters.run(dilate, fixed_mask)
    level_masks = [_mask_on(metric_mask, lvl.image, filters) for lvl in fixed]

    coarse = 0
    scorer = _SearchScorer(fixed[coarse], level_masks[coarse], moving[coarse])
    fixed_points = _mask_points(fixed_mask, 3000)
    moving_points = _mask_points(moving_mask, 3000)
    cut_directions = [(_direction(moving_mr)[:, i], True) for i in _cut_axes(moving_mask)]
    cut_directions += [(_direction(fixed_ct)[:, i], False) for i in _cut_axes(fixed_mask)]
    scored = []
    for label, r, off in _candidates(fixed_center, fixed_axes, moving_center, moving_axes):
        for k, slide in enumerate(_slides(r, off, fixed_points, moving_points, cut_directions)):
            scored.append((scorer.score(r, off + slide), f"{label}/{k}", r, off + slide))
    scored.sort(key=lambda s: -s[0])
    polished = [
        (*_polish(scorer, r, off, fixed_center), label)
        for _, label, r, off in _distinct(scored, POLISH_CANDIDATES)
    ]
    scored = sorted(((sc, label, r, off) for sc, r, off, label in polished), key=lambda s: -s[0])
    t_search = time.perf_counter()
    log.debug(
        "search over %d poses, top: %s", len(scored), [(round(s[0], 3), s[1]) for s in scored[:6]]
    )

    iterations = 0
    best: _Refined | None = None
    for score, label, r, off in _distinct(scored, REFINE_CANDIDATES):
        # y = R x + off written as R (x - c) + c + t with c the CT head centre.
        init = _rigid(r, fixed_center, r @ fixed_center + off - fixed_center)
        refined = _refine_level(
            fixed, level_masks, moving, init, fixed_center, coarse, threads, fixed_points
        )
        iterations += refined.iterations
        log.debug(
            "candidate %s score %.3f -> metric %.4f (%d it, %s) angle %.1f",
            label,
            score,
            refined.metric,
            refined.iterations,
            refined.stop,
            _rotation_angle_deg(_affine_of(refined.transform)[0]),
        )
        if best is None or refined.metric < best.metric:
            best = refined
    if best is None:
        raise RegistrationError("no registration candidate")
    for level in range(1, len(LEVEL_SPACINGS_MM)):
        best = _refine_level(
            fixed, level_masks, moving, best.transform, fixed_center, level, threads, fixed_points
        )
        iterations += best.iterations
        log.debug(
            "level %d: metric %.4f after %d iterations (%s)",
            level,
            best.metric,
            best.iterations,
            best.stop,
        )
    transform = best.transform
    t_refine = time.perf_counter()

    dice, overlap = _mask_dice(fixed_mask, moving_mask, transform, filters)
    a, _ = _affine_of(transform)
    angle = _rotation_angle_deg(a)
    seconds = time.perf_counter() - t0
    quality = RegistrationQuality(
        metric_value=best.metric,
        mask_dice=dice,
        iterations=iterations,
        seconds=seconds,
        angle_from_header_deg=angle,
    )
    log.info(
        "registration: metric %.4f, mask Dice %.3f, %d iterations, %.1f s "
        "(prepare %.1f, search %.1f, refine %.1f), %.1f deg from header",
        quality.metric_value,
        dice,
        iterations,
        seconds,
        t_prep - t0,
        t_search - t_prep,
        t_refine - t_search,
        angle,
    )
    if angle > WARN_ANGLE_DEG:
        quality.warnings.append(
            f"MR turned {angle:.0f} degrees about the {_axis_name(a)} axis against what the DICOM "
            "headers imply (patient position entered wrongly, e.g. feet-first vs head-first?): "
            "verify the fusion before use"
        )
    problems: list[str] = []
    if dice < MIN_MASK_DICE:
        problems.append(f"head-mask Dice {dice:.2f} < {MIN_MASK_DICE:.2f}")
    if quality.metric_value > MAX_METRIC_VALUE:
        problems.append(f"Mattes metric {quality.metric_value:.3f} > {MAX_METRIC_VALUE:.3f}")
    if overlap < MIN_OVERLAP:
        problems.append(f"only {overlap:.0%} of the CT head lies in the MR field of view")
    if problems:
        message = "registration unreliable: " + "; ".join(problems)
        if not accept_unreliable:
            raise RegistrationError(message, quality=quality)
        quality.warnings.append(message)
    return RegistrationResult(transform=transform, quality=quality)


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
    if interpolator not in _INTERPOLATORS:
        raise InputError(
            f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}"
        )
    for image, what in ((fixed, "fixed"), (moving, "moving")):
        if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
            raise InputError(f"{what} must be a 3-D SimpleITK image")
    filters = _Filters(None)
    src = filters.cast(moving, sitk.sitkFloat32)
    out = filters.resample(
        src, fixed, transform, _INTERPOLATORS[interpolator], math.nan, sitk.sitkFloat32
    )
    mask = filters.run(sitk.EqualImageFilter(), out, out)  # NaN != NaN: 0 outside the data
    masker = sitk.MaskImageFilter()
    masker.SetOutsideValue(float(default))
    out = filters.run(masker, out, mask)
    return out, mask


def reg_matrix_mr_to_ct(transform: sitk.Transform) -> FloatArray:
    """4x4 DICOM Frame of Reference Transformation Matrix: MR patient coords -> CT coords.

    ``transform`` is ITK's fixed-to-moving map (CT point -> MR point), so the DICOM matrix
    (PS3.3 C.20.2, which maps the registered series' coordinates into the reference frame) is
    its inverse. This is the only place in the project where the direction is converted.
    """
    a, b = _affine_of(transform)
    forward = np.eye(4)
    forward[:3, :3] = a
    forward[:3, 3] = b
    if abs(np.linalg.det(a)) < 1e-9:
        raise InputError("transform is singular; it has no inverse")
    inverse = np.linalg.inv(forward).astype(np.float64)
    inverse[3] = (0.0, 0.0, 0.0, 1.0)
    out: FloatArray = inverse
    return out
