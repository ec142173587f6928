"""Settings derived from the config, and the backoff they imply."""

from __future__ import annotations

from dicom_node.config import NodeConfig
from dicom_node.orchestration import jobs


def test_derived_intervals_follow_their_source_keys() -> None:
    cfg = NodeConfig.model_validate(
        {"jobs": {"lease_seconds": 40}, "pairing": {"series_quiet_seconds": 8}}
    )
    s = jobs.Settings.from_config(cfg)
    assert s.heartbeat_seconds == 10.0 and s.scan_interval_seconds == 2.0
    explicit = NodeConfig.model_validate(
        {"jobs": {"heartbeat_seconds": 3}, "pairing": {"scan_interval_seconds": 7}}
    )
    s = jobs.Settings.from_config(explicit)
    assert s.heartbeat_seconds == 3.0 and s.scan_interval_seconds == 7.0
    slow = jobs.Settings.from_config(
        NodeConfig.model_validate({"pairing": {"series_quiet_seconds": 600}})
    )
    assert slow.scan_interval_seconds == 5.0  # capped, so completion is noticed quickly


def test_backoff_doubles_up_to_the_cap() -> None:
    assert jobs.backoff_seconds(1, 2, 100) == 2 and jobs.backoff_seconds(3, 2, 100) == 8
    assert jobs.backoff_seconds(4, 2, 10) == 10 and jobs.backoff_seconds(0, 2, 10) == 0
