"""``/metrics`` in the Prometheus text format: no login, no patient data.

Two sources, one page:

- the listener's counters kept in this process (:mod:`dicom_node.metrics`): instances received,
  associations by result, bytes received, store latency;
- figures read from the database at scrape time by :class:`DatabaseCollector`, because the
  worker is another process and perhaps another machine: jobs by state, stage durations
  (register, fuse, derive, send) as histograms from ``job_stages``, sends by destination and
  state, send failures by destination, series by state and completed; plus free disk bytes,
  the floor, worker and database up.

Counters read from the database (series completed, send failures) count rows still in the
index: retention deleting old rows makes them drop, which Prometheus treats as a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.console.views import STAGE_NAMES, count_by, disk_view
from dicom_node.models import Job, JobStage, Send, Series
from dicom_node.states import JobState, SendState, SeriesState

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])

STAGE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of the stage-duration histograms: seconds (send) to an hour (fuse)."""


class DatabaseCollector(Collector):
    """Job, stage, send and series figures read from the index at each scrape."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        config: Callable[[], NodeConfig],
        worker_alive: Callable[[], bool | None],
    ) -> None:
        """Read through ``sessions``; ``config`` gives the configuration in force."""
        self.sessions = sessions
        self.config = config
        self.worker_alive = worker_alive

    def describe(self) -> list[Metric]:
        """Nothing described up front: the registry must not scrape the database at start."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every figure; the database ones only when it answers (``dicom_node_database_up``)."""
        yield from self._disk_and_worker()
        up = GaugeMetricFamily("dicom_node_database_up", "1 when the index answered this scrape")
        try:
            with self.sessions() as session:
                families = list(self._from_database(session))
        except SQLAlchemyError as exc:
            log.warning("metrics: database unreachable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _disk_and_worker(self) -> Iterator[Metric]:
        try:
            disk = disk_view(self.config())
        except OSError:
            disk = None
        if disk is not None:
            yield GaugeMetricFamily(
                "dicom_node_disk_free_bytes",
                "Free bytes on the storage disk",
                value=disk.free_bytes,
            )
            yield GaugeMetricFamily(
                "dicom_node_disk_min_free_bytes",
                "storage.min_free_mb in bytes: below it C-STOREs are refused",
                value=disk.min_free_bytes,
            )
        alive = self.worker_alive()
        if alive is not None:
            yield GaugeMetricFamily(
                "dicom_node_worker_up", "1 when the embedded fusion worker runs", value=int(alive)
            )

    def _from_database(self, session: Session) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("dicom_node_jobs", "Fusion jobs by state", labels=["state"])
        for state, n in count_by(session, Job.state, JobState).items():
            jobs.add_metric([state], n)
        yield jobs
        series = GaugeMetricFamily(
            "dicom_node_series", "Received series by completion state", labels=["state"]
        )
        by_state = count_by(session, Series.state, SeriesState)
        for state, n in by_state.items():
            series.add_metric([state], n)
        yield series
        yield CounterMetricFamily(
            "dicom_node_series_completed",
            "Series that became complete (quiet period passed), in the index",
            value=by_state[SeriesState.COMPLETE],
        )
        yield self._stage_histogram(session)
        yield from self._sends(session)

    def _stage_histogram(self, session: Session) -> Metric:
        seconds = JobStage.seconds
        columns: list[Any] = [JobStage.stage, func.count(), func.coalesce(func.sum(seconds), 0.0)]
        columns += [func.sum(case((seconds <= b, 1), else_=0)) for b in STAGE_BUCKETS]
        rows = session.execute(
            select(*columns)
            .where(JobStage.seconds.is_not(None), JobStage.error.is_(None))
            .group_by(JobStage.stage)
        ).all()
        hist = HistogramMetricFamily(
            "dicom_node_job_stage_seconds",
            "Duration of successful job stages (register, fuse, derive, send)",
            labels=["stage"],
        )
        found = {JobState(row[0]): row for row in rows}
        for state, name in STAGE_NAMES.items():
            row = found.get(state)
            count, total = (int(row[1]), float(row[2])) if row else (0, 0.0)
            cumulative = [int(row[3 + i] or 0) if row else 0 for i in range(len(STAGE_BUCKETS))]
            buckets = [(repr(b), c) for b, c in zip(STAGE_BUCKETS, cumulative, strict=True)]
            buckets.append(("+Inf", count))
            hist.add_metric([name], buckets, total)
        return hist

    def _sends(self, session: Session) -> Iterator[Metric]:
        sends = GaugeMetricFamily(
            "dicom_node_sends", "Sends by destination and state", labels=["destination", "state"]
        )
        failures = CounterMetricFamily(
            "dicom_node_send_failures",
            "Sends that failed for good (every attempt used, or job cancelled), by destination",
            labels=["destination"],
        )
        rows = session.execute(
            select(Send.destination, Send.state, func.count()).group_by(
                Send.destination, Send.state
            )
        ).all()
        per_dest: dict[str, dict[str, int]] = {}
        for dest, send_state, n in rows:
            per_dest.setdefault(str(dest), {str(s): 0 for s in SendState})[str(send_state)] = int(n)
        for dest in self.config().destinations:
            per_dest.setdefault(dest, {str(s): 0 for s in SendState})
        for dest, states in sorted(per_dest.items()):
            for state_name, n in states.items():
                sends.add_metric([dest, state_name], n)
            failures.add_metric([dest], states[SendState.FAILED])
        yield sends
        yield failures


def registry_for(
    sessions: sessionmaker[Session],
    config: Callable[[], NodeConfig],
    worker_alive: Callable[[], bool | None],
) -> CollectorRegistry:
    """The registry ``/metrics`` renders: this process's counters plus the database's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward(metrics.REGISTRY))
    registry.register(DatabaseCollector(sessions, config, worker_alive))
    return registry


class _Forward(Collector):
    """Another registry's metrics, rendered as part of this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def prometheus_metrics(request: Request) -> Response:
    """The node's metrics in the Prometheus text exposition format."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
