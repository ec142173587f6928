"""A job's derived files and their manifest: complete or recomputed, never half reused."""

from __future__ import annotations

from pathlib import Path

import pydicom

from dicom_node.config import NodeConfig
from dicom_node.states import DerivedKind
from dicom_node.storage.derived import (
    DerivedFile,
    job_dir,
    manifest_info,
    read_manifest,
    write_job_outputs,
)


def test_outputs_and_manifest_round_trip(tmp_path: Path, ct_files: list[Path]) -> None:
    datasets = {
        DerivedKind.FUSED: [pydicom.dcmread(f) for f in ct_files[:2]],
        DerivedKind.REG: [pydicom.dcmread(ct_files[2])],
    }
    folder = tmp_path / "derived" / "7"
    (folder / "stale").mkdir(parents=True)  # leftovers of an interrupted attempt
    files = write_job_outputs(folder, datasets, {"job": 7, "warnings": ["w"]})
    assert not (folder / "stale").exists()
    assert read_manifest(folder) == files
    assert [f.kind for f in files] == [DerivedKind.FUSED, DerivedKind.FUSED, DerivedKind.REG]
    assert all(isinstance(f, DerivedFile) and f.path.is_file() for f in files)
    assert manifest_info(folder) == {"job": 7, "warnings": ["w"]}
    files[0].path.unlink()
    assert read_manifest(folder) is None  # a missing file makes the manifest incomplete


def test_job_dir_lies_under_storage_root(tmp_path: Path) -> None:
    config = NodeConfig.model_validate({"storage": {"root": str(tmp_path)}})
    assert job_dir(config, 12) == tmp_path / "derived" / "12"
    assert read_manifest(tmp_path / "nothing") is None and manifest_info(tmp_path) == {}
