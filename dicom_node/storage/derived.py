"""A job's derived objects on disk: ``storage.root/derived/<job id>/<kind>/<SOPUID>.dcm``.

The worker writes every derived object (each file durably, see :mod:`.fsutil`) and only then
``manifest.json``, which lists them. A folder without a complete manifest is the leftover of an
interrupted attempt and is recomputed; a folder with one is reused, so a send retry never
recomputes and never sends different objects under the same UIDs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.states import DerivedKind
from dicom_node.storage.fsutil import fsync_dir, make_dirs, write_durably, write_text_durably

MANIFEST = "manifest.json"
DERIVED_DIR = "derived"
PREVIEW = "preview.png"
"""The fusion's preview picture (CT, registered MR, fused, checkerboard) in a job's folder;
written after the manifest, for people only (never sent, not listed in the manifest)."""


@dataclass(frozen=True)
class DerivedFile:
    """One derived instance on disk."""

    kind: DerivedKind
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


def job_dir(config: NodeConfig, job_id: int) -> Path:
    """Folder of a job's derived files: ``storage.root/derived/<job id>``."""
    return config.storage.root / DERIVED_DIR / str(int(job_id))


def save_dataset(ds: Dataset, path: Path) -> None:
    """Write one DICOM object as a Part-10 file, durably."""
    write_durably(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


def write_job_outputs(
    folder: Path, datasets: Mapping[DerivedKind, Sequence[Dataset]], info: Mapping[str, Any]
) -> list[DerivedFile]:
    """Write every derived dataset of a job, then the manifest that marks them complete."""
    if folder.exists():
        shutil.rmtree(folder)  # leftovers of an interrupted attempt: never half-reuse them
    make_dirs(folder)
    files: list[DerivedFile] = []
    for kind, items in datasets.items():
        sub = folder / kind
        sub.mkdir()
        for ds in items:
            sop = str(ds.SOPInstanceUID)
            path = sub / f"{sop}.dcm"
            save_dataset(ds, path)
            files.append(DerivedFile(kind, sop, str(ds.SeriesInstanceUID), path))
        fsync_dir(folder)
    write_manifest(folder, files, info)
    return files


def write_manifest(folder: Path, files: Sequence[DerivedFile], info: Mapping[str, Any]) -> Path:
    """Atomically write the manifest that marks a job's derived files complete."""
    data = {
        **info,
        "files": [
            {
                "kind": str(f.kind),
                "sop_instance_uid": f.sop_instance_uid,
                "series_instance_uid": f.series_instance_uid,
                "path": f.path.relative_to(folder).as_posix(),
            }
            for f in files
        ],
    }
    path = folder / MANIFEST
    write_text_durably(path, json.dumps(data, indent=1))
    return path


def read_manifest(folder: Path) -> list[DerivedFile] | None:
    """The derived files listed by a complete manifest, or None when there is none (or a file
    it lists is missing)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = []
    for item in data.get("files", []):
        f = DerivedFile(
            kind=DerivedKind(item["kind"]),
            sop_instance_uid=str(item["sop_instance_uid"]),
            series_instance_uid=str(item["series_instance_uid"]),
            path=folder / str(item["path"]),
        )
        if not f.path.is_file():
            return None
        files.append(f)
    return files


def manifest_info(folder: Path) -> dict[str, Any]:
    """The manifest's extra information (stage seconds, warnings, quality), {} if none."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k != "files"}
