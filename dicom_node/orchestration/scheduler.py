"""Periodic work of ``dicom-node serve`` on apscheduler: completion scan, send retries,
restart recovery, retention, prefetch of MRs from the PACS and supervision of the embedded
worker.

Every task runs in apscheduler's thread pool inside the serve process (never in the SCP's
handler threads), with ``max_instances=1`` and ``coalesce=True`` so a slow tick never piles up.
A task that raises is logged and runs again at its next tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.models import utcnow
from dicom_node.orchestration import dispatch, jobs, pairing, prefetch
from dicom_node.storage import retention
from dicom_node.storage.store import Store

log = logging.getLogger(__name__)

SEND_RETRY_INTERVAL = 1.0
SUPERVISE_INTERVAL = 2.0
RETENTION_INTERVAL = 3600.0
PREFETCH_RECHECK_MARGIN = timedelta(minutes=1)
"""How far back each scan looks again for prefetches that ended "retrieved" (commits that
landed while the previous scan was reading)."""


class NodeScheduler:
    """The serve process's scheduler; :meth:`reload` swaps in a new config."""

    def __init__(
        self,
        config: NodeConfig,
        sessions: sessionmaker[Session],
        *,
        supervise: Callable[[], None] | None = None,
        store: Store | None = None,
    ) -> None:
        """Schedule the node's periodic tasks for ``config`` (started by :meth:`start`);
        ``store`` receives what a C-GET prefetch retrieves."""
        self.config = config
        self.sessions = sessions
        self._supervise = supervise
        self._store = store
        self._sweep_prefetch = True
        self._retrieved_since: datetime | None = None
        self.owner = jobs.owner_id("scheduler")
        # apscheduler logs every run at INFO: keep it to warnings
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )

    def start(self) -> None:
        """Start the tasks (the first scan and recovery run at once)."""
        cfg = jobs.Settings.from_config(self.config)
        now = datetime.now(UTC)
        add = self._scheduler.add_job
        add(self.scan, "interval", seconds=cfg.scan_interval_seconds, id="scan", next_run_time=now)
        add(self.retry_sends, "interval", seconds=SEND_RETRY_INTERVAL, id="sends")
        add(self.run_prefetch, "interval", seconds=cfg.scan_interval_seconds, id="prefetch")
        add(
            self.recover,
            "interval",
            seconds=max(0.5, cfg.lease_seconds / 2),
            id="recover",
            next_run_time=now,
        )
        add(
            self.retention,
            "interval",
            seconds=RETENTION_INTERVAL,
            id="retention",
            next_run_time=now,
        )
        if self._supervise is not None:
            add(self.supervise, "interval", seconds=SUPERVISE_INTERVAL, id="supervise")
        self._scheduler.start()
        log.info(
            "scheduler started (scan every %.1fs, quiet period %.1fs)",
            cfg.scan_interval_seconds,
            self.config.pairing.series_quiet_seconds,
        )

    def stop(self) -> None:
        """Stop the tasks, waiting for running ones."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def reload(self, config: NodeConfig) -> None:
        """Use ``config`` from the next tick on (quiet periods, rules, routing, retention)."""
        old = jobs.Settings.from_config(self.config)
        if config.prefetch != self.config.prefetch:
            self._sweep_prefetch = True  # e.g. just enabled: look at every waiting CT
        self.config = config
        new = jobs.Settings.from_config(config)
        if new.scan_interval_seconds != old.scan_interval_seconds and self._scheduler.running:
            for task in ("scan", "prefetch"):
                self._scheduler.reschedule_job(
                    task, trigger="interval", seconds=new.scan_interval_seconds
                )

    # ------------------------------------------------------------------ tasks
    def scan(self) -> None:
        """Complete quiet series and pair (see :func:`dicom_node.orchestration.pairing.scan`)."""
        try:
            result = pairing.scan(self.sessions, self.config)
        except Exception:
            log.exception("completion/pairing scan failed")
            return
        if result.jobs:
            log.info(
                "scan: %d series complete, jobs queued: %s",
                len(result.completed),
                ", ".join(str(j) for j in result.jobs),
            )
        self._prefetch_hooks(result.waiting)

    def _prefetch_hooks(self, waiting: list[str]) -> None:
        """After pairing: request prefetches for CTs that wait, pair CTs whose MR arrived."""
        sweep, self._sweep_prefetch = self._sweep_prefetch, False
        started = utcnow()
        try:
            prefetch.request_for_waiting(self.sessions, self.config, None if sweep else waiting)
            prefetch.pair_retrieved(self.sessions, self.config, self._retrieved_since)
            self._retrieved_since = started - PREFETCH_RECHECK_MARGIN
        except Exception:
            self._sweep_prefetch = sweep
            log.exception("prefetch request/pairing failed")

    def run_prefetch(self) -> None:
        """Query the PACS for waiting CTs' MRs and retrieve them (:mod:`.prefetch`)."""
        if not self.config.prefetch.enabled:
            return
        try:
            prefetch.run_due(self.sessions, self.config, self._store, self.owner)
        except Exception:
            log.exception("prefetch failed")

    def retry_sends(self) -> None:
        """Run due per-destination send retries and close jobs whose sends ended."""
        try:
            dispatch.retry_due_sends(self.sessions, self.config, self.owner)
        except Exception:
            log.exception("send retries failed")

    def recover(self) -> None:
        """Requeue jobs of workers whose heartbeat stopped."""
        try:
            jobs.recover_stale(
                self.sessions,
                jobs.Settings.from_config(self.config),
                local_host=jobs.host_identity(),
            )
        except Exception:
            log.exception("stale job recovery failed")

    def retention(self) -> None:
        """Delete data of jobs done more than ``retention.days`` ago (when enabled)."""
        if not self.config.retention.enabled:
            return
        try:
            retention.clean(self.sessions, self.config)
        except Exception:
            log.exception("retention clean-up failed")

    def supervise(self) -> None:
        """Restart the embedded worker if it died."""
        if self._supervise is None:
            return
        try:
            self._supervise()
        except Exception:
            log.exception("worker supervision failed")
