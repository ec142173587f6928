"""The volume pipeline: CT + MR series -> registered MR, fused series, REG object.

``run_pair`` is the computation shared by the worker and the offline command:

1. ``register``  rigid MR -> CT (:func:`fusion_engine.registration.register`);
2. ``resample``  MR onto the CT grid + mask of where the MR has data;
3. ``fuse``      :func:`fusion_engine.volume.fuse_volume` over the CT's real slices;
4. ``derive``    the three derived objects (:mod:`dicom_node.imaging.derive`).

``run_offline`` adds reading the two folders, writing the objects and a PNG preview:

```
OUT_DIR/fused/IM0001.dcm ...          fused series, one file per CT slice
OUT_DIR/registered_mr/IM0001.dcm ...  MR resampled on the CT grid
OUT_DIR/reg/REG0001.dcm               Spatial Registration object
OUT_DIR/preview.png                   CT, registered MR, fused, checkerboard (3 planes)
OUT_DIR/summary.json                  stage times, registration quality, warnings, UIDs
```
"""

from __future__ import annotations

import json
import logging
import os
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

from dicom_node.errors import PipelineError
from dicom_node.imaging import derive
from dicom_node.imaging.volumes import SeriesVolume, read_series_dir
from fusion_engine.defaults import DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig
    from fusion_engine.registration import RegistrationQuality

log = logging.getLogger(__name__)

DEFAULT_MAX_GAP_MM = 10.0
"""Largest gap between stored slices that the offline command accepts (interpolated for
registration only; derived slices sit exactly on the CT's own slices). See docs/pipeline.md."""

STAGES: tuple[str, ...] = ("read", "register", "resample", "fuse", "derive", "write", "preview")
KINDS: tuple[str, ...] = ("fused", "registered_mr", "reg")
SUBFOLDERS: dict[str, str] = {"fused": "fused", "registered_mr": "registered_mr", "reg": "reg"}


@dataclass
class PipelineResult:
    """What :func:`run_pair` / :func:`run_offline` produced."""

    datasets: dict[str, list[Dataset]]
    stage_seconds: dict[str, float]
    warnings: list[str]
    quality: RegistrationQuality
    images: dict[str, sitk.Image] = field(default_factory=dict)
    paths: dict[str, list[Path]] = field(default_factory=dict)
    matrix_mr_to_ct: npt.NDArray[np.float64] | None = None
    transform: sitk.Transform | None = None


@dataclass
class _Settings:
    strategy: str = "mean-attention"
    ct_window: tuple[float, float] = (40.0, 400.0)
    batch_size: int = DEFAULT_BATCH_SIZE
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    uid_root: str = "2.25"
    series_number_base: int = 9000
    max_gap_mm: float = DEFAULT_MAX_GAP_MM


def _settings(config: NodeConfig | None, **overrides: Any) -> _Settings:
    s = _Settings()
    if config is not None:
        s.strategy = config.fusion.strategy
        s.ct_window = (float(config.fusion.ct_window[0]), float(config.fusion.ct_window[1]))
        s.batch_size = int(config.fusion.batch_size)
        s.precision = config.fusion.precision
        s.device = config.worker.device
        s.threads = config.worker.threads
        s.uid_root = config.derive.uid_root
        s.series_number_base = int(config.derive.series_number_base)
        volumes_section = getattr(config, "volumes", None)
        if volumes_section is not None and hasattr(volumes_section, "max_gap_mm"):
            s.max_gap_mm = float(volumes_section.max_gap_mm)
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    return s


def _affine(transform: sitk.Transform) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(A, b) with transform(p) = A p + b, from four points (exact for affine transforms)."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    cols = [np.array(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3).tolist()]
    return np.column_stack(cols), origin


def mr_slices_per_ct_slice(
    ct: SeriesVolume, mr: SeriesVolume, transform: sitk.Transform, mask: sitk.Image
) -> list[list[int]]:
    """For each real CT slice, the MR source slices (indices into ``mr.datasets``) it used.

    The corners of the slice's MR-mask bounding box are mapped into the MR; every stored MR
    slice within the interpolation reach of that range counts (a superset, never a miss).
    """
    a, b = _affine(transform)
    mask_arr = sitk.GetArrayViewFromImage(mask)
    ct_img, mr_img = ct.image, mr.image
    ct_dir = np.array(ct_img.GetDirection()).reshape(3, 3) * np.array(ct_img.GetSpacing())
    ct_org = np.array(ct_img.GetOrigin())
    mr_dir = np.array(mr_img.GetDirection()).reshape(3, 3) * np.array(mr_img.GetSpacing())
    mr_inv = np.linalg.inv(mr_dir)
    mr_org = np.array(mr_img.GetOrigin())
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
        phys = corners @ ct_dir.T + ct_org
        in_mr = (phys @ a.T + b - mr_org) @ mr_inv.T
        lo = float(np.floor(in_mr[:, 2].min() - 1e-6))
        hi = float(np.ceil(in_mr[:, 2].max() + 1e-6))
        first = max(int(np.searchsorted(real_mr, lo, side="right")) - 1, 0)
        last = min(int(np.searchsorted(real_mr, hi, side="left")), len(real_mr) - 1)
        out.append(list(range(first, last + 1)))
    return out


def gap_warnings(vol: SeriesVolume, what: str) -> list[str]:
    """Warnings about slices interpolated on a series' lattice."""
    if vol.interpolated_slices == 0:
        return []
    return [
        f"{what} has {vol.interpolated_slices} missing slice positions between its "
        f"{len(vol.datasets)} stored slices; interpolated for registration only, derived "
        "slices lie on the stored CT slices"
    ]


def run_pair(
    ct: SeriesVolume,
    mr: SeriesVolume,
    *,
    config: NodeConfig | None = None,
    on_stage: Callable[[str], None] | None = None,
    revision: int = 0,
    salt: str = "",
    strategy: str | None = None,
    accept_unreliable: bool = False,
    fuse_progress: Callable[[int, int], None] | None = None,
) -> PipelineResult:
    """Register, resample, fuse and derive for one CT/MR pair (no I/O).

    Stages are announced through ``on_stage`` ("register", "resample", "fuse", "derive").
    Raises :class:`PipelineError` when the registration is unreliable (unless
    ``accept_unreliable``); a misregistered fusion is never produced silently.
    """
    from fusion_engine.errors import RegistrationError
    from fusion_engine.registration import reg_matrix_mr_to_ct, register, resample_to
    from fusion_engine.volume import fuse_volume

    settings = _settings(config, strategy=strategy)
    times: dict[str, float] = {}

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)

    if ct.modality != "CT":
        log.warning("fixed series has modality %s, expected CT", ct.modality)
    stage("register")
    t0 = time.perf_counter()
    try:
        reg = register(
            ct.image, mr.image, threads=settings.threads, accept_unreliable=accept_unreliable
        )
    except RegistrationError as exc:
        raise PipelineError(
            f"registration of {mr.description} onto {ct.description} failed: {exc}"
        ) from exc
    times["register"] = time.perf_counter() - t0
    warnings = [*reg.quality.warnings, *gap_warnings(ct, "CT"), *gap_warnings(mr, "MR")]
    reg_warnings = list(reg.quality.warnings)

    stage("resample")
    t0 = time.perf_counter()
    mr_on_ct, mask = resample_to(ct.image, mr.image, reg.transform)
    mr_slices = mr_slices_per_ct_slice(ct, mr, reg.transform, mask)
    matrix = np.asarray(reg_matrix_mr_to_ct(reg.transform), dtype=np.float64)
    times["resample"] = time.perf_counter() - t0

    stage("fuse")
    t0 = time.perf_counter()
    fused = fuse_volume(
        ct.image,
        mr_on_ct,
        mask,
        strategy=settings.strategy,
        device=settings.device,
        batch_size=settings.batch_size,
        ct_window=settings.ct_window,
        progress=fuse_progress,
        slices=ct.slice_indices,
        threads=settings.threads,
        precision=settings.precision,
    )
    times["fuse"] = time.perf_counter() - t0

    stage("derive")
    t0 = time.perf_counter()
    from fusion_engine import __version__ as engine_version

    model_version = _model_version()
    opts = derive.DeriveOptions(
        uid_root=settings.uid_root,
        series_number_base=settings.series_number_base,
        salt=salt,
        revision=revision,
        software_version=engine_version,
        warnings=reg_warnings,
    )
    q = reg.quality
    comment = (
        f"Mattes MI rigid, metric {q.metric_value:.3f}, head Dice {q.mask_dice:.2f}, "
        f"{q.angle_from_header_deg:.0f} deg from header"
    )
    datasets = {
        "fused": derive.fused_series(
            ct,
            mr,
            fused,
            mr_slices=mr_slices,
            model_version=model_version,
            strategy=settings.strategy,
            options=opts,
        ),
        "registered_mr": derive.registered_mr_series(
            ct, mr, mr_on_ct, mr_slices=mr_slices, options=opts
        ),
        "reg": [derive.spatial_registration(ct, mr, matrix, comment=comment, options=opts)],
    }
    times["derive"] = time.perf_counter() - t0
    return PipelineResult(
        datasets=datasets,
        stage_seconds=times,
        warnings=warnings,
        quality=reg.quality,
        images={"ct": ct.image, "mr_on_ct": mr_on_ct, "mask": mask, "fused": fused},
        matrix_mr_to_ct=matrix,
        transform=reg.transform,
    )


def _model_version() -> str:
    try:
        from fusion_engine import inference

        return str(inference.MODEL_VERSION)
    except Exception as exc:  # version text only; fusion itself reports real errors
        log.debug("model version unavailable: %s", exc)
        return "unknown"


def write_datasets(datasets: dict[str, list[Dataset]], out_dir: Path) -> dict[str, list[Path]]:
    """Write each kind into its subfolder (``fused/IM0001.dcm``, ``reg/REG0001.dcm``, ...).

    Files are written to a temporary name and renamed, so a folder never holds half a file.
    Existing ``*.dcm`` files of a kind's subfolder are removed first (a re-run replaces them).
    """
    written: dict[str, list[Path]] = {}
    for kind, items in datasets.items():
        folder = out_dir / SUBFOLDERS.get(kind, kind)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.dcm"):
            old.unlink()
        prefix = "REG" if kind == "reg" else "IM"
        paths: list[Path] = []
        for number, ds in enumerate(items, start=1):
            path = folder / f"{prefix}{number:04d}.dcm"
            tmp = path.with_suffix(".tmp")
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
            paths.append(path)
        written[kind] = paths
    return written


@contextmanager
def _progress_ui(
    enabled: bool,
) -> Iterator[tuple[Callable[[str], None], Callable[[int, int], None]]]:
    """Rich progress bar: one task for the stages, one for the fused slices."""
    if not enabled:
        yield (lambda _name: None), (lambda _done, _total: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        stages = bar.add_task("pipeline", total=len(STAGES))
        slices = bar.add_task("fused slices", total=None, visible=False)

        def on_stage(name: str) -> None:
            done = STAGES.index(name) if name in STAGES else 0
            bar.update(stages, completed=done, description=f"pipeline: {name}")

        def on_slices(done: int, total: int) -> None:
            bar.update(slices, completed=done, total=max(total, 1), visible=True)

        yield on_stage, on_slices
        bar.update(stages, completed=len(STAGES), description="pipeline: done")


def run_offline(
    ct_dir: Path,
    mr_dir: Path,
    out_dir: Path,
    *,
    config: NodeConfig | None = None,
    progress: bool = True,
    strategy: str | None = None,
    accept_unreliable: bool = False,
    max_gap_mm: float | None = None,
    revision: int = 0,
    salt: str = "offline",
) -> PipelineResult:
    """Read CT and MR folders, run :func:`run_pair`, write the objects, preview and summary.

    Used by ``dicom-node fuse``. Output layout: see the module docstring.
    """
    from dicom_node.imaging.preview import write_preview

    settings = _settings(config, strategy=strategy, max_gap_mm=max_gap_mm)
    times: dict[str, float] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with _progress_ui(progress) as (on_stage, on_slices):
        on_stage("read")
        t0 = time.perf_counter()
        ct = read_series_dir(Path(ct_dir), max_gap_mm=settings.max_gap_mm)
        mr = read_series_dir(Path(mr_dir), max_gap_mm=settings.max_gap_mm)
        times["read"] = time.perf_counter() - t0
        result = run_pair(
            ct,
            mr,
            config=config,
            on_stage=on_stage,
            revision=revision,
            salt=salt,
            strategy=settings.strategy,
            accept_unreliable=accept_unreliable,
            fuse_progress=on_slices,
        )
        times.update(result.stage_seconds)
        on_stage("write")
        t0 = time.perf_counter()
        result.paths = write_datasets(result.datasets, out_dir)
        times["write"] = time.perf_counter() - t0
        on_stage("preview")
        t0 = time.perf_counter()
        q = result.quality
        write_preview(
            out_dir / "preview.png",
            ct=result.images["ct"],
            mr_on_ct=result.images["mr_on_ct"],
            mask=result.images["mask"],
            fused=result.images["fused"],
            ct_window=settings.ct_window,
            warnings=result.warnings,
            title=(
                f"MR-CT fusion ({settings.strategy}) — registration: metric "
                f"{q.metric_value:.3f}, head Dice {q.mask_dice:.2f}, "
                f"{q.angle_from_header_deg:.0f}° from header — not for dose calculation"
            ),
        )
        times["preview"] = time.perf_counter() - t0
    result.stage_seconds = times
    _write_summary(out_dir / "summary.json", ct, mr, result)
    for name in STAGES:
        if name in times:
            log.info("stage %-8s %6.1f s", name, times[name])
    return result


def _write_summary(path: Path, ct: SeriesVolume, mr: SeriesVolume, result: PipelineResult) -> None:
    q = result.quality
    summary = {
        "ct_series_uid": ct.series_uid,
        "mr_series_uid": mr.series_uid,
        "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
        "warnings": result.warnings,
        "quality": {
            "metric_value": q.metric_value,
            "mask_dice": q.mask_dice,
            "iterations": q.iterations,
            "seconds": q.seconds,
            "angle_from_header_deg": q.angle_from_header_deg,
            "warnings": list(q.warnings),
        },
        "matrix_mr_to_ct": None
        if result.matrix_mr_to_ct is None
        else result.matrix_mr_to_ct.tolist(),
        "series": {
            kind: {
                "series_uid": str(items[0].SeriesInstanceUID) if items else None,
                "series_number": int(items[0].SeriesNumber) if items else None,
                "instances": len(items),
                "folder": SUBFOLDERS.get(kind, kind),
            }
            for kind, items in result.datasets.items()
        },
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


def read_pair(
    ct_paths: Sequence[Path], mr_paths: Sequence[Path], *, config: NodeConfig | None = None
) -> tuple[SeriesVolume, SeriesVolume]:
    """Read a stored CT and MR series with the pipeline's gap policy (for the worker)."""
    from dicom_node.imaging.volumes import read_series

    settings = _settings(config)
    return (
        read_series(ct_paths, max_gap_mm=settings.max_gap_mm),
        read_series(mr_paths, max_gap_mm=settings.max_gap_mm),
    )
