"""The orchestration settings a job or send transition needs, derived from the config once.

Every value comes from :class:`~dicom_node.config.NodeConfig` (where its default lives); the
only computation here is for the keys whose config default is "derived from another key"
(``jobs.heartbeat_seconds``, ``pairing.scan_interval_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.config import NodeConfig

MIN_TICK_SECONDS = 0.2
"""Shortest heartbeat or scan interval derived from other settings (keeps tests fast, CPUs idle)."""

MAX_DERIVED_SCAN_SECONDS = 5.0
"""Longest scan interval derived from the quiet period when none is configured."""


@dataclass(frozen=True)
class Settings:
    """Retry, lease and polling settings of the job table."""

    max_attempts: int
    retry_backoff_seconds: float
    max_backoff_seconds: float
    send_max_attempts: int
    lease_seconds: float
    heartbeat_seconds: float
    poll_seconds: float
    scan_interval_seconds: float

    @classmethod
    def from_config(cls, config: NodeConfig) -> Settings:
        """The settings of ``config`` (``jobs.*``, ``worker.poll_seconds``, the scan interval)."""
        jobs = config.jobs
        heartbeat = jobs.heartbeat_seconds
        if heartbeat is None:
            heartbeat = max(MIN_TICK_SECONDS, jobs.lease_seconds / 4.0)
        scan = config.pairing.scan_interval_seconds
        if scan is None:
            quarter = config.pairing.series_quiet_seconds / 4.0
            scan = min(MAX_DERIVED_SCAN_SECONDS, max(MIN_TICK_SECONDS, quarter))
        return cls(
            max_attempts=jobs.max_attempts,
            retry_backoff_seconds=jobs.retry_backoff_seconds,
            max_backoff_seconds=jobs.max_backoff_seconds,
            send_max_attempts=jobs.send_max_attempts,
            lease_seconds=jobs.lease_seconds,
            heartbeat_seconds=heartbeat,
            poll_seconds=config.worker.poll_seconds,
            scan_interval_seconds=scan,
        )

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (see :func:`backoff_seconds`)."""
        return backoff_seconds(attempt, self.retry_backoff_seconds, self.max_backoff_seconds)


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff before retry number ``attempt`` (1-based): base * 2**(attempt-1)."""
    if attempt < 1:
        return 0.0
    return float(min(cap, base * (2.0 ** min(attempt - 1, 30))))
