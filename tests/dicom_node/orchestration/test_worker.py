"""The worker's start-up line says how fusion will really run (device, resolved precision);
each job leaves a preview picture for the admin console."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from dicom_node.config import DEFAULT_MAX_GAP_MM, NodeConfig
from dicom_node.imaging.pipeline import PipelineResult
from dicom_node.imaging.volumes import read_series_dir
from dicom_node.orchestration import worker
from dicom_node.storage.derived import PREVIEW
from fusion_engine import onednn
from fusion_engine.registration import RegistrationQuality
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.derived import identity_outputs


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "channels_last")])
def test_bf16_request_is_reported_as_it_will_run(
    native: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onednn, "bf16_supported", lambda: native)
    cfg = NodeConfig.model_validate({"worker": {"device": "cpu"}, "fusion": {"precision": "bf16"}})
    assert worker.compute_summary(cfg) == f"device cpu, precision {expected}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_is_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    cfg = NodeConfig.model_validate({"worker": {"device": "cuda"}})
    with caplog.at_level(logging.ERROR, logger="dicom_node.orchestration.worker"):
        summary = worker.compute_summary(cfg)
    assert "unusable" in summary
    assert "CUDA is not available" in caplog.text


def _result(images: dict[str, sitk.Image]) -> PipelineResult:
    quality = RegistrationQuality(
        metric_value=-0.4, mask_dice=0.9, iterations=10, seconds=1.0, angle_from_header_deg=2.0
    )
    return PipelineResult(
        datasets={}, stage_seconds={}, warnings=["a warning"], quality=quality, images=images
    )


def test_job_preview_written_for_the_console(tmp_path: Path) -> None:
    require_small_fixtures()
    ct = read_series_dir(SMALL_CT, max_gap_mm=DEFAULT_MAX_GAP_MM)
    mr = read_series_dir(SMALL_MR, max_gap_mm=0.0)
    out = identity_outputs(ct, mr)
    images = {"ct": ct.image, "mr_on_ct": out.mr_on_ct, "mask": out.mask, "fused": out.fused}
    worker._write_preview(tmp_path, 7, _result(images), NodeConfig())
    assert (tmp_path / PREVIEW).read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == [PREVIEW]  # no temporary file left


def test_preview_failure_costs_only_the_picture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="dicom_node.orchestration.worker"):
        worker._write_preview(tmp_path, 7, _result({}), NodeConfig())  # nothing to draw
    assert "job 7: preview picture not written" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_worker_starts_on_the_file_as_it_reads_now(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An edit saved between the spawn and the worker's start is not lost."""
    path = tmp_path / "node.yaml"
    path.write_text(
        "routing: {send_to: [TPS]}\ndestinations: {TPS: {ae_title: T, host: h, port: 1}}\n"
    )
    spawned_with = NodeConfig()
    assert worker._file_config(path, spawned_with).routing.send_to == ["TPS"]
    path.write_text("node: {port: 0}\n")
    with caplog.at_level(logging.ERROR, logger="dicom_node.orchestration.worker"):
        assert worker._file_config(path, spawned_with) is spawned_with
    assert "config file invalid at worker start" in caplog.text
