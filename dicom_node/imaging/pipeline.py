"""The volume pipeline: CT + MR series -> registered MR, fused series, REG object.

:func:`run_pair` is the computation shared by the worker and ``dicom-node fuse``
(:mod:`dicom_node.imaging.offline`):

1. ``register``  rigid MR -> CT (:func:`fusion_engine.register`);
2. ``resample``  MR onto the CT grid + mask of where the MR has data;
3. ``fuse``      :func:`fusion_engine.fuse_volume` over the CT's stored slices;
4. ``derive``    the derived objects (:mod:`dicom_node.imaging.derive`).

This is the border with :mod:`fusion_engine`: every error it raises is translated here into
the node's own error classes (:mod:`dicom_node.errors`), which say whether a retry can help.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.errors import (
    ModelError,
    PipelineError,
    RegistrationUnreliableError,
)
from dicom_node.imaging import derive
from dicom_node.imaging.volumes import SeriesVolume, read_series
from dicom_node.states import DerivedKind, Stage

if TYPE_CHECKING:
    from fusion_engine.registration import RegistrationQuality, RegistrationResult

log = logging.getLogger(__name__)

StageCallback = Callable[[Stage], None]
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PipelineSettings:
    """What the pipeline computes with, all from :class:`NodeConfig` (plus command overrides)."""

    strategy: str
    ct_window: tuple[float, float]
    batch_size: int
    precision: str
    device: str
    threads: int | None
    max_gap_mm: float

    @classmethod
    def from_config(cls, config: NodeConfig, *, strategy: str | None = None) -> PipelineSettings:
        """The settings of ``config``; ``strategy`` overrides ``fusion.strategy``."""
        return cls(
            strategy=strategy or config.fusion.strategy,
            ct_window=config.fusion.ct_window,
            batch_size=config.fusion.batch_size,
            precision=config.fusion.precision,
            device=config.worker.device,
            threads=config.worker.threads,
            max_gap_mm=config.volumes.max_gap_mm,
        )


@dataclass
class PipelineResult:
    """What :func:`run_pair` produced."""

    datasets: dict[DerivedKind, list[Dataset]]
    stage_seconds: dict[Stage, float]
    warnings: list[str]
    quality: RegistrationQuality
    images: dict[str, sitk.Image] = field(default_factory=dict)
    matrix_mr_to_ct: npt.NDArray[np.float64] | None = None
    transform: sitk.Transform | None = None

    def quality_info(self) -> dict[str, Any]:
        """The registration quality as JSON-ready data (manifest, summary, job detail)."""
        return dataclasses.asdict(self.quality)


@dataclass
class _Run:
    """The inputs and bookkeeping of one :func:`run_pair` call."""

    ct: SeriesVolume
    mr: SeriesVolume
    config: NodeConfig
    settings: PipelineSettings
    on_stage: StageCallback
    times: dict[Stage, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: Stage) -> Iterator[None]:
        """Announce ``name`` and time it."""
        self.on_stage(name)
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0


def read_pair(
    ct_paths: Sequence[Path], mr_paths: Sequence[Path], *, config: NodeConfig
) -> tuple[SeriesVolume, SeriesVolume]:
    """Read a stored CT and MR series with the configured gap policy (for the worker)."""
    max_gap = config.volumes.max_gap_mm
    return read_series(ct_paths, max_gap_mm=max_gap), read_series(mr_paths, max_gap_mm=max_gap)


def run_pair(
    ct: SeriesVolume,
    mr: SeriesVolume,
    *,
    config: NodeConfig,
    on_stage: StageCallback | None = None,
    revision: int = 0,
    salt: str = "",
    strategy: str | None = None,
    accept_unreliable: bool = False,
    fuse_progress: ProgressCallback | None = None,
) -> PipelineResult:
    """Register, resample, fuse and derive for one CT/MR pair (no I/O).

    Raises :class:`RegistrationUnreliableError` when the registration is unreliable (unless
    ``accept_unreliable``): a misregistered fusion is never produced silently.
    """
    settings = PipelineSettings.from_config(config, strategy=strategy)
    run = _Run(ct, mr, config, settings, on_stage or (lambda _stage: None))
    if ct.modality != "CT":
        log.warning("fixed series has modality %s, expected CT", ct.modality)
    with run.stage(Stage.REGISTER):
        reg = _register(run, accept_unreliable)
    with run.stage(Stage.RESAMPLE):
        mr_on_ct, mask, mr_slices, matrix = _resample(run, reg)
    with run.stage(Stage.FUSE):
        fused = _fuse(run, mr_on_ct, mask, fuse_progress)
    with run.stage(Stage.DERIVE):
        datasets = _derive(run, reg, fused, mr_on_ct, mr_slices, matrix, salt, revision)
    return PipelineResult(
        datasets=datasets,
        stage_seconds=run.times,
        warnings=[*reg.quality.warnings, *gap_warnings(ct, "CT"), *gap_warnings(mr, "MR")],
        quality=reg.quality,
        images={"ct": ct.image, "mr_on_ct": mr_on_ct, "mask": mask, "fused": fused},
        matrix_mr_to_ct=matrix,
        transform=reg.transform,
    )


def _register(run: _Run, accept_unreliable: bool) -> RegistrationResult:
    """Rigid registration, with fusion_engine's errors translated."""
    from fusion_engine.errors import InputError, RegistrationError
    from fusion_engine.registration import register

    try:
        return register(
            run.ct.image,
            run.mr.image,
            threads=run.settings.threads,
            accept_unreliable=accept_unreliable,
        )
    except RegistrationError as exc:
        quality = dataclasses.asdict(exc.quality) if exc.quality is not None else None
        raise RegistrationUnreliableError(
            f"registration of {run.mr.description} onto {run.ct.description} failed: {exc}",
            quality=quality,
        ) from exc
    except InputError as exc:
        raise PipelineError(f"cannot register these series: {exc}") from exc


def _resample(
    run: _Run, reg: RegistrationResult
) -> tuple[sitk.Image, sitk.Image, list[list[int]], npt.NDArray[np.float64]]:
    """The MR on the CT grid, its data mask, each CT slice's MR sources and the REG matrix."""
    from fusion_engine.registration import reg_matrix_mr_to_ct, resample_to

    mr_on_ct, mask = resample_to(run.ct.image, run.mr.image, reg.transform)
    mr_slices = mr_slices_per_ct_slice(run.ct, run.mr, reg.transform, mask)
    matrix = np.asarray(reg_matrix_mr_to_ct(reg.transform), dtype=np.float64)
    return mr_on_ct, mask, mr_slices, matrix


def _fuse(
    run: _Run, mr_on_ct: sitk.Image, mask: sitk.Image, progress: ProgressCallback | None
) -> sitk.Image:
    """Fuse every stored CT slice with the MR on it, with fusion_engine's errors translated."""
    from fusion_engine.errors import FusionEngineError, InputError, WeightsError
    from fusion_engine.volume import fuse_volume

    s = run.settings
    try:
        return fuse_volume(
            run.ct.image,
            mr_on_ct,
            mask,
            strategy=s.strategy,
            device=s.device,
            batch_size=s.batch_size,
            ct_window=s.ct_window,
            progress=progress,
            slices=run.ct.slice_indices,
            threads=s.threads,
            precision=s.precision,
        )
    except WeightsError as exc:
        raise ModelError(f"fusion model unusable: {exc}") from exc
    except InputError as exc:
        raise PipelineError(f"cannot fuse these series: {exc}") from exc
    except FusionEngineError as exc:
        raise ModelError(f"fusion failed: {exc}") from exc


def _derive(
    run: _Run,
    reg: RegistrationResult,
    fused: sitk.Image,
    mr_on_ct: sitk.Image,
    mr_slices: list[list[int]],
    matrix: npt.NDArray[np.float64],
    salt: str,
    revision: int,
) -> dict[DerivedKind, list[Dataset]]:
    """The derived objects of one pair, in the CT's study and Frame of Reference."""
    ct, mr, q = run.ct, run.mr, reg.quality
    opts = derive.DeriveOptions.from_config(
        run.config, salt=salt, revision=revision, warnings=q.warnings
    )
    comment = (
        f"Mattes MI rigid, metric {q.metric_value:.3f}, head Dice {q.mask_dice:.2f}, "
        f"{q.angle_from_header_deg:.0f} deg from header"
    )
    fused_series = derive.fused_series(
        ct,
        mr,
        fused,
        mr_slices=mr_slices,
        model_version=model_version(),
        strategy=run.settings.strategy,
        options=opts,
    )
    return {
        DerivedKind.FUSED: fused_series,
        DerivedKind.REGISTERED_MR: derive.registered_mr_series(
            ct, mr, mr_on_ct, mr_slices=mr_slices, options=opts
        ),
        DerivedKind.REG: [
            derive.spatial_registration(ct, mr, matrix, comment=comment, options=opts)
        ],
    }


def model_version() -> str:
    """The shipped fusion model's version (named in the fused series' descriptions)."""
    from fusion_engine.errors import WeightsError
    from fusion_engine.inference import model_version as engine_model_version

    try:
        return engine_model_version()
    except WeightsError as exc:
        raise ModelError(f"fusion model unusable: {exc}") from exc


def affine_of(transform: sitk.Transform) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(A, b) with transform(p) = A p + b, from four points (exact for affine transforms)."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    cols = [np.array(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3).tolist()]
    return np.column_stack(cols), origin


def mr_slices_per_ct_slice(
    ct: SeriesVolume, mr: SeriesVolume, transform: sitk.Transform, mask: sitk.Image
) -> list[list[int]]:
    """For each stored CT slice, the MR source slices (indices into ``mr.datasets``) it used.

    The corners of the slice's MR-mask bounding box are mapped into the MR; every stored MR
    slice within the interpolation reach of that range counts (a superset, never a miss).
    """
    a, b = affine_of(transform)
    mask_arr = sitk.GetArrayViewFromImage(mask)
    ct_dir, ct_org = _index_to_physical(ct.image)
    mr_dir, mr_org = _index_to_physical(mr.image)
    mr_inv = np.linalg.inv(mr_dir)
    real_mr = np.array(mr.slice_indices)
    out: list[list[int]] = []
    for z in ct.slice_indices:
        rows = np.flatnonzero(mask_arr[z].any(axis=1))
        if rows.size == 0:
            out.append([])
            continue
        cols = np.flatnonzero(mask_arr[z].any(axis=0))
        corners = np.array(
            [[x, y, z] for x in (cols[0], cols[-1]) for y in (rows[0], rows[-1])], dtype=np.float64
        )
        in_mr = ((corners @ ct_dir.T + ct_org) @ a.T + b - mr_org) @ mr_inv.T
        lo = float(np.floor(in_mr[:, 2].min() - 1e-6))
        hi = float(np.ceil(in_mr[:, 2].max() + 1e-6))
        first = max(int(np.searchsorted(real_mr, lo, side="right")) - 1, 0)
        last = min(int(np.searchsorted(real_mr, hi, side="left")), len(real_mr) - 1)
        out.append(list(range(first, last + 1)))
    return out


def _index_to_physical(
    image: sitk.Image,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(M, o) with physical = M @ index + o for ``image``."""
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return direction, np.array(image.GetOrigin())


def gap_warnings(vol: SeriesVolume, what: str) -> list[str]:
    """Warnings about slices interpolated on a series' lattice."""
    if vol.interpolated_slices == 0:
        return []
    return [
        f"{what} has {vol.interpolated_slices} missing slice positions between its "
        f"{len(vol.datasets)} stored slices; interpolated for registration only, derived "
        "slices lie on the stored CT slices"
    ]
