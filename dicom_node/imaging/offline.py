"""``dicom-node fuse``: the pipeline on two folders, without network or database.

:func:`run_offline` reads the CT and MR folders, runs :func:`~.pipeline.run_pair`, and writes
(each file durably, see :mod:`dicom_node.storage.fsutil`)::

    OUT_DIR/fused/IM0001.dcm ...          fused series, one file per CT slice
    OUT_DIR/registered_mr/IM0001.dcm ...  MR resampled on the CT grid
    OUT_DIR/reg/REG0001.dcm               Spatial Registration object
    OUT_DIR/preview.png                   CT, registered MR, fused, checkerboard (3 planes)
    OUT_DIR/summary.json                  stage times, registration quality, warnings, UIDs
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.imaging.pipeline import (
    PipelineResult,
    PipelineSettings,
    ProgressCallback,
    StageCallback,
    run_pair,
)
from dicom_node.imaging.volumes import SeriesVolume, read_series_dir
from dicom_node.states import DerivedKind, Stage
from dicom_node.storage.derived import PREVIEW, save_dataset
from dicom_node.storage.fsutil import make_dirs, write_text_durably

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
__all__ = ["PREVIEW", "SUMMARY", "run_offline", "write_datasets", "write_result_preview"]


def run_offline(
    ct_dir: Path,
    mr_dir: Path,
    out_dir: Path,
    *,
    config: NodeConfig,
    progress: bool = True,
    strategy: str | None = None,
    accept_unreliable: bool = False,
    revision: int = 0,
    salt: str = "offline",
) -> tuple[PipelineResult, dict[DerivedKind, list[Path]]]:
    """Read CT and MR folders, run the pipeline, write the objects, preview and summary.

    Returns the pipeline result and the written files of each kind.
    """
    settings = PipelineSettings.from_config(config, strategy=strategy)
    make_dirs(out_dir)
    with _progress_ui(progress) as (on_stage, on_slices):
        t0 = time.perf_counter()
        on_stage(Stage.READ)
        ct = read_series_dir(Path(ct_dir), max_gap_mm=settings.max_gap_mm)
        mr = read_series_dir(Path(mr_dir), max_gap_mm=settings.max_gap_mm)
        read_seconds = time.perf_counter() - t0
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
        result.stage_seconds = {Stage.READ: read_seconds, **result.stage_seconds}
        with _timed(result, Stage.WRITE, on_stage):
            paths = write_datasets(result.datasets, out_dir)
        with _timed(result, Stage.PREVIEW, on_stage):
            write_result_preview(out_dir / PREVIEW, result, settings)
    _write_summary(out_dir / SUMMARY, ct, mr, result)
    for name, seconds in result.stage_seconds.items():
        log.info("stage %-8s %6.1f s", name, seconds)
    return result, paths


@contextmanager
def _timed(result: PipelineResult, stage: Stage, on_stage: StageCallback) -> Iterator[None]:
    on_stage(stage)
    t0 = time.perf_counter()
    yield
    result.stage_seconds[stage] = time.perf_counter() - t0


def write_datasets(
    datasets: Mapping[DerivedKind, Sequence[Dataset]], out_dir: Path
) -> dict[DerivedKind, list[Path]]:
    """Write each kind into its folder (``fused/IM0001.dcm``, ``reg/REG0001.dcm``, ...).

    Existing ``*.dcm`` files of a kind's folder are removed first (a re-run replaces them).
    """
    written: dict[DerivedKind, list[Path]] = {}
    for kind, items in datasets.items():
        folder = out_dir / kind
        make_dirs(folder)
        for old in folder.glob("*.dcm"):
            old.unlink()
        prefix = "REG" if kind == DerivedKind.REG else "IM"
        paths = [folder / f"{prefix}{number:04d}.dcm" for number in range(1, len(items) + 1)]
        for ds, path in zip(items, paths, strict=True):
            save_dataset(ds, path)
        written[kind] = paths
    return written


def write_result_preview(path: Path, result: PipelineResult, settings: PipelineSettings) -> None:
    """The preview PNG of a pipeline result (``dicom-node fuse`` and the worker's jobs)."""
    from dicom_node.imaging.preview import write_preview

    q = result.quality
    write_preview(
        path,
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


def _write_summary(path: Path, ct: SeriesVolume, mr: SeriesVolume, result: PipelineResult) -> None:
    summary: dict[str, Any] = {
        "ct_series_uid": ct.series_uid,
        "mr_series_uid": mr.series_uid,
        "stage_seconds": {str(k): round(v, 3) for k, v in result.stage_seconds.items()},
        "warnings": result.warnings,
        "quality": result.quality_info(),
        "matrix_mr_to_ct": None
        if result.matrix_mr_to_ct is None
        else result.matrix_mr_to_ct.tolist(),
        "series": {
            str(kind): {
                "series_uid": str(items[0].SeriesInstanceUID) if items else None,
                "series_number": int(items[0].SeriesNumber) if items else None,
                "instances": len(items),
                "folder": str(kind),
            }
            for kind, items in result.datasets.items()
        },
    }
    write_text_durably(path, json.dumps(summary, indent=2))


@contextmanager
def _progress_ui(enabled: bool) -> Iterator[tuple[StageCallback, ProgressCallback]]:
    """Rich progress bar: one task for the stages, one for the fused slices."""
    if not enabled:
        yield (lambda _name: None), (lambda _done, _total: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stages = list(Stage)
    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        stage_task = bar.add_task("pipeline", total=len(stages))
        slice_task = bar.add_task("fused slices", total=None, visible=False)

        def on_stage(name: Stage) -> None:
            bar.update(stage_task, completed=stages.index(name), description=f"pipeline: {name}")

        def on_slices(done: int, total: int) -> None:
            bar.update(slice_task, completed=done, total=max(total, 1), visible=True)

        yield on_stage, on_slices
        bar.update(stage_task, completed=len(stages), description="pipeline: done")
