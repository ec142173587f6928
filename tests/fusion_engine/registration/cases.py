"""Registration validation cases with known truth (shared by the tests and the benchmark).

A case is a CT (fixed), an MR-like moving image made from that CT by :mod:`synth`, and the true
transform ``truth`` (CT point -> MR point, ITK convention like ``register``'s result). Error
(TRE) is measured over the CT head: its voxels at about 2 mm (largest object above -400 HU),
restricted to those the truth maps inside the MR's field of view, since only there does the
planner see MR data. Negative cases are made from positive ones: the correct result perturbed
by a known shift or turn, the MR mirrored left-right, or an MR of another subject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from tests.fusion_engine.registration import synth

FloatArray = npt.NDArray[np.float64]


def read_series(directory: Path) -> sitk.Image:
    """Read a DICOM series directory with SimpleITK (test/benchmark use only)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    out: sitk.Image = reader.Execute()
    return out


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


def about_axis(
    axis: FloatArray, degrees: float, shift: FloatArray, center: tuple[float, float, float]
) -> sitk.Euler3DTransform:
    """x -> R (x - c) + c + shift, R a turn of ``degrees`` about the unit vector ``axis``."""
    versor = sitk.VersorRigid3DTransform()
    versor.SetCenter(center)
    versor.SetRotation([float(v) for v in axis / np.linalg.norm(axis)], math.radians(degrees))
    versor.SetTranslation([float(v) for v in shift])
    tr = sitk.Euler3DTransform()
    tr.SetCenter(center)
    tr.SetMatrix(versor.GetMatrix())
    tr.SetTranslation(versor.GetTranslation())
    return tr


def random_rigid(
    rng: np.random.Generator, max_deg: float, max_mm: float, center: tuple[float, float, float]
) -> sitk.Euler3DTransform:
    """A random axis, an angle in [max/3, max] and a shift in [max/3, max] in a random direction."""
    axis = rng.normal(size=3)
    shift = rng.normal(size=3)
    shift *= rng.uniform(1.0 / 3.0, 1.0) * max_mm / np.linalg.norm(shift)
    return about_axis(axis, rng.uniform(1.0 / 3.0, 1.0) * max_deg, shift, center)


def compose(first: sitk.Transform, then: sitk.Transform) -> sitk.Transform:
    """The transform x -> then(first(x))."""
    out = sitk.CompositeTransform(3)
    out.AddTransform(then)
    out.AddTransform(first)
    return out


def flip_about_y(center: tuple[float, float, float]) -> sitk.Euler3DTransform:
    """180 degrees about the anterior-posterior axis: the feet-first/head-first confusion."""
    return rigid((0.0, 180.0, 0.0), (0.0, 0.0, 0.0), center)


def head_mask(ct: sitk.Image) -> sitk.Image:
    """Largest object above -400 HU at about 2 mm (uint8)."""
    factors = [max(1, round(2.0 / s)) for s in ct.GetSpacing()]
    small = sitk.BinShrink(ct, factors)
    mask = sitk.BinaryThreshold(small, -400.0, 1e9, 1, 0)
    mask = sitk.BinaryMorphologicalOpening(mask, [1, 1, 1])
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    out: sitk.Image = sitk.Cast(labels == 1, sitk.sitkUInt8)
    return out


def head_points(ct: sitk.Image, count: int = 20000, seed: int = 0) -> FloatArray:
    """Physical points (mm) of at most ``count`` voxels of :func:`head_mask`."""
    mask = head_mask(ct)
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)
    if idx.shape[0] > count:
        idx = idx[np.random.default_rng(seed).choice(idx.shape[0], count, replace=False)]
    a = np.array(mask.GetDirection()).reshape(3, 3) @ np.diag(mask.GetSpacing())
    pts: FloatArray = idx @ a.T + np.array(mask.GetOrigin())
    return pts


def box_center(ct: sitk.Image) -> tuple[float, float, float]:
    """Centre (mm) of the bounding box of the CT head."""
    pts = head_points(ct)
    c = (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    return (float(c[0]), float(c[1]), float(c[2]))


def map_points(transform: sitk.Transform, points: FloatArray) -> FloatArray:
    """``transform`` applied to each row of ``points``."""
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in points])


def inside(image: sitk.Image, points: FloatArray) -> npt.NDArray[np.bool_]:
    """Which physical ``points`` lie within ``image``'s field of view (voxel centres +- 1/2)."""
    a = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    idx = (points - np.array(image.GetOrigin())) @ np.linalg.inv(a).T
    size = np.array(image.GetSize(), dtype=np.float64)
    out: npt.NDArray[np.bool_] = np.all((idx >= -0.5) & (idx <= size - 0.5), axis=1)
    return out


@dataclass
class Error:
    """TRE (mm) of an estimate against the truth over head points."""

    mean_mm: float
    max_mm: float
    points: int


def tre(
    estimate: sitk.Transform, truth: sitk.Transform, points: FloatArray, mr: sitk.Image | None
) -> Error:
    """Mean and max distance between where ``estimate`` and ``truth`` send the CT ``points``;
    only points that ``truth`` maps into ``mr``'s field of view count when ``mr`` is given."""
    want = map_points(truth, points)
    if mr is not None:
        keep = inside(mr, want)
        points, want = points[keep], want[keep]
    if points.shape[0] == 0:
        return Error(math.nan, math.nan, 0)
    d = np.linalg.norm(map_points(estimate, points) - want, axis=1)
    return Error(float(d.mean()), float(d.max()), int(points.shape[0]))


# ----------------------------------------------------------------------------- case catalogue


@dataclass(frozen=True)
class Acquisition:
    """An MR acquisition: orientation (name in :data:`synth.ORIENTATIONS`) tilted by ``tilt``
    degrees about the left-right axis (and half as much about anterior-posterior), pixel and
    slice size, in-plane field of view, and ``coverage_mm`` across slices (``None``: the whole
    head plus margin). A slab's centre sits ``slab_offset`` x the free room from the head centre
    along the slice normal (-1 .. 1)."""

    name: str
    orientation: str
    pixel_mm: float
    slice_mm: float
    fov_mm: float = 240.0
    tilt: float = 0.0
    coverage_mm: float | None = None
    slab_offset: float = 0.0


ACQUISITIONS: tuple[Acquisition, ...] = (
    Acquisition("axial-2d-5mm", "axial", 0.5, 5.0),
    Acquisition("axial-2d-4mm", "axial", 0.9, 4.0, fov_mm=230.0),
    Acquisition("axial-2d-6mm", "axial", 0.8, 6.0),
    Acquisition("sagittal-3d-1mm", "sagittal", 1.0, 1.0, fov_mm=256.0),
    Acquisition("coronal-2d-3mm", "coronal", 0.8, 3.0),
    Acquisition("oblique-axial-4mm", "axial", 0.7, 4.0, tilt=20.0),
    Acquisition("slab-axial-60mm", "axial", 0.6, 5.0, coverage_mm=60.0, slab_offset=0.5),
    Acquisition(
        "slab-oblique-60mm", "axial", 0.7, 5.0, tilt=18.0, coverage_mm=60.0, slab_offset=-0.4
    ),
    Acquisition(
        "slab-oblique-40mm", "axial", 0.6, 4.0, tilt=25.0, coverage_mm=40.0, slab_offset=0.2
    ),
    Acquisition("slab-sagittal-50mm", "sagittal", 0.7, 5.0, coverage_mm=50.0, slab_offset=0.3),
    Acquisition("slab-coronal-45mm", "coronal", 0.8, 3.0, coverage_mm=45.0, slab_offset=-0.5),
    Acquisition(
        "small-fov-3d", "axial", 1.0, 1.5, fov_mm=140.0, coverage_mm=100.0, slab_offset=0.3
    ),
)


@dataclass(frozen=True)
class CaseSpec:
    """One positive case: acquisition, contrast, the true pose and the image impairments."""

    name: str
    acquisition: Acquisition
    contrast: str
    degrees: float
    axis: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    feet_first: bool = False
    bias: float = 0.2
    noise: float = 0.04
    seed: int = 0


@dataclass
class Case:
    """A built case: the MR-like image, its truth and the spec it came from."""

    spec: CaseSpec
    moving: sitk.Image
    truth: sitk.Transform
    extra: dict[str, float] = field(default_factory=dict)


def catalogue(count: int, seed: int, max_deg: float = 30.0, max_mm: float = 40.0) -> list[CaseSpec]:
    """``count`` positive cases cycling through :data:`ACQUISITIONS` and T1/T2/FLAIR, with random
    truths up to ``max_deg`` and ``max_mm`` (every fourth also turned feet-first)."""
    rng = np.random.default_rng(seed)
    contrasts = list(synth.CONTRASTS)
    specs = []
    for i in range(count):
        acq = ACQUISITIONS[i % len(ACQUISITIONS)]
        contrast = contrasts[(i + i // len(ACQUISITIONS)) % len(contrasts)]
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        shift = rng.normal(size=3)
        shift *= rng.uniform(0.25, 1.0) * max_mm / np.linalg.norm(shift)
        degrees = max_deg if i % 5 == 0 else rng.uniform(0.25, 1.0) * max_deg
        specs.append(
            CaseSpec(
                name=f"{i:02d}-{acq.name}-{contrast}",
                acquisition=acq,
                contrast=contrast,
                degrees=float(degrees),
                axis=(float(axis[0]), float(axis[1]), float(axis[2])),
                shift_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
                feet_first=i % 4 == 3,
                bias=float(rng.uniform(0.1, 0.3)),
                noise=float(rng.uniform(0.02, 0.06)),
                seed=seed * 1000 + i,
            )
        )
    return specs


def truth_of(spec: CaseSpec, center: tuple[float, float, float]) -> sitk.Transform:
    """The case's true transform (CT -> MR), rotating about the CT head centre."""
    tr: sitk.Transform = about_axis(
        np.array(spec.axis), spec.degrees, np.array(spec.shift_mm), center
    )
    if spec.feet_first:
        tr = compose(flip_about_y(center), tr)
    return tr


def grid_of(
    acq: Acquisition, truth: sitk.Transform, head: FloatArray, scale: float = 1.0
) -> synth.Grid:
    """The acquisition grid around the moved head (``head``: CT head points).

    ``scale`` multiplies the pixel and slice sizes (the small fixtures use coarser grids).
    """
    moved = map_points(truth, head)
    base = synth.ORIENTATIONS[acq.orientation]
    tilt = synth_rotation(acq.tilt)
    direction = tilt @ base
    along = moved @ direction  # coordinates along row, column, normal
    lo, hi = along.min(axis=0), along.max(axis=0)
    mid = (lo + hi) / 2.0
    extent = [acq.fov_mm, acq.fov_mm, float(hi[2] - lo[2]) + 20.0]
    if acq.coverage_mm is not None:
        room = max(0.0, (hi[2] - lo[2]) / 2.0 - acq.coverage_mm / 2.0 - 10.0)
        mid[2] += acq.slab_offset * room
        extent[2] = acq.coverage_mm
        if acq.fov_mm < 200.0:
            mid[:2] += acq.slab_offset * 15.0
    return synth.Grid(
        direction=direction,
        pixel_mm=acq.pixel_mm * scale,
        slice_mm=min(max(acq.slice_mm, 6.0), acq.slice_mm * scale),
        extent_mm=(extent[0], extent[1], extent[2]),
        center=direction @ mid,
    )


def synth_rotation(tilt: float) -> FloatArray:
    """Turn of ``tilt`` degrees about x followed by ``tilt / 2`` about y (an oblique plane)."""
    rx = about_axis(np.array([1.0, 0.0, 0.0]), tilt, np.zeros(3), (0.0, 0.0, 0.0))
    ry = about_axis(np.array([0.0, 1.0, 0.0]), tilt / 2.0, np.zeros(3), (0.0, 0.0, 0.0))
    m: FloatArray = np.array(ry.GetMatrix()).reshape(3, 3) @ np.array(rx.GetMatrix()).reshape(3, 3)
    return m


def build(
    spec: CaseSpec,
    signals: dict[str, sitk.Image],
    head: FloatArray,
    center: tuple[float, float, float],
    scale: float = 1.0,
) -> Case:
    """Make the MR-like image of ``spec`` from the CT's tissue signals (by contrast name)."""
    truth = truth_of(spec, center)
    grid = grid_of(spec.acquisition, truth, head, scale)
    moving = synth.mr_like(
        signals[spec.contrast],
        truth,
        grid,
        bias=spec.bias,
        noise=spec.noise,
        seed=spec.seed,
    )
    return Case(spec, moving, truth)


def perturbed(
    result: sitk.Transform, kind: str, amount: float, center: tuple[float, float, float], seed: int
) -> sitk.Transform:
    """``result`` followed by a shift of ``amount`` mm (``kind`` "mm") or a turn of ``amount``
    degrees about the head centre (``kind`` "deg"), in a random direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    if kind == "mm":
        move = about_axis(np.array([0.0, 0.0, 1.0]), 0.0, amount * direction, center)
    else:
        move = about_axis(direction, amount, np.zeros(3), center)
    # CT x -> result(move(x)): the MR is looked up at a point moved in CT space.
    return compose(move, result)


def read_volume(directory: Path) -> sitk.Image:
    """A series as the node reads it (slices on their true positions, gaps interpolated), as
    float32. SimpleITK's series reader assumes equal slice spacing, which the MRI-DIR CT does
    not have (gaps of 0.6 to 3.8 mm): its volume would be stretched in places."""
    from dicom_node.config import DEFAULT_MAX_GAP_MM
    from dicom_node.imaging.volumes import read_series_dir

    volume = read_series_dir(directory, max_gap_mm=DEFAULT_MAX_GAP_MM)
    out: sitk.Image = sitk.Cast(volume.image, sitk.sitkFloat32)
    return out


@dataclass
class Source:
    """A CT prepared for synthesis: the CT, its head points and centre, tissue signals."""

    ct: sitk.Image
    head: FloatArray
    center: tuple[float, float, float]
    signals: dict[str, sitk.Image]

    @staticmethod
    def of(ct: sitk.Image) -> Source:
        """Prepare ``ct`` (HU) for :func:`build`."""
        clean = synth.clean_ct(ct)
        signals = {name: synth.tissue_signal(clean, c) for name, c in synth.CONTRASTS.items()}
        return Source(ct, head_points(ct), box_center(ct), signals)

    def build(self, spec: CaseSpec) -> Case:
        """The MR-like case of ``spec``."""
        return build(spec, self.signals, self.head, self.center)
