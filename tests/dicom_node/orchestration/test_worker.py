"""The worker's start-up line says how fusion will really run (device, resolved precision)."""

from __future__ import annotations

import logging

import pytest
import torch

from dicom_node.config import NodeConfig
from dicom_node.orchestration import worker
from fusion_engine import onednn


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
