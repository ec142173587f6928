"""The pipeline border: settings from the config, fusion_engine errors translated, provenance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_node.config import NodeConfig
from dicom_node.errors import PipelineError, RegistrationUnreliableError
from dicom_node.imaging.pipeline import (
    PipelineSettings,
    affine_of,
    gap_warnings,
    mr_slices_per_ct_slice,
    run_pair,
)
from dicom_node.imaging.volumes import SeriesVolume
from dicom_node.states import Stage


def _volume(array: np.ndarray, modality: str) -> SeriesVolume:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    return SeriesVolume(
        image=image,
        datasets=[],
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=f"2.25.{len(modality)}",
        study_uid="2.25.9",
        frame_of_reference_uid="2.25.8",
        modality=modality,
        slice_indices=list(range(array.shape[0])),
    )


def test_settings_come_from_the_config() -> None:
    cfg = NodeConfig.model_validate(
        {
            "fusion": {"strategy": "l1-norm", "ct_window": [50, 350], "batch_size": 4},
            "worker": {"device": "cpu", "threads": 2},
            "volumes": {"max_gap_mm": 6},
        }
    )
    s = PipelineSettings.from_config(cfg)
    assert (s.strategy, s.ct_window, s.batch_size, s.threads) == ("l1-norm", (50, 350), 4, 2)
    assert s.max_gap_mm == 6.0 and s.device == "cpu"
    assert PipelineSettings.from_config(cfg, strategy="addition").strategy == "addition"
    defaults = PipelineSettings.from_config(NodeConfig())
    assert dataclasses.asdict(defaults)["strategy"] == NodeConfig().fusion.strategy


def test_unreliable_registration_is_a_node_error_that_is_not_retried() -> None:
    rng = np.random.default_rng(3)
    head = np.zeros((24, 48, 48), dtype=np.float32)
    head[4:20, 10:38, 12:36] = 1000.0
    ct = _volume(head, "CT")
    noise = _volume(rng.uniform(0, 1000, size=(24, 48, 48)), "MR")
    stages: list[Stage] = []
    with pytest.raises(RegistrationUnreliableError) as info:
        run_pair(ct, noise, config=NodeConfig(), on_stage=stages.append)
    assert stages == [Stage.REGISTER]
    assert info.value.retryable is False


def test_invalid_input_is_a_pipeline_error() -> None:
    flat = _volume(np.zeros((1, 8, 8)), "CT")  # a single slice cannot be registered
    with pytest.raises(PipelineError):
        run_pair(flat, flat, config=NodeConfig())


def test_mr_sources_of_each_ct_slice(ct_volume: SeriesVolume, mr_volume: SeriesVolume) -> None:
    from fusion_engine.registration import resample_to

    transform = sitk.Euler3DTransform()
    _, mask = resample_to(ct_volume.image, mr_volume.image, transform)
    sources = mr_slices_per_ct_slice(ct_volume, mr_volume, transform, mask)
    assert len(sources) == len(ct_volume.datasets)
    covered = [s for s in sources if s]
    assert covered and all(0 <= j < len(mr_volume.datasets) for s in covered for j in s)
    assert all(s == sorted(s) for s in covered)


def test_affine_of_and_gap_warnings(ct_volume: SeriesVolume) -> None:
    t = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, 6.0))
    a, b = affine_of(t)
    p = np.array([10.0, -7.0, 3.5])
    np.testing.assert_allclose(a @ p + b, t.TransformPoint(tuple(p)), atol=1e-9)
    warned = gap_warnings(ct_volume, "CT")
    assert (ct_volume.interpolated_slices > 0) == bool(warned)
