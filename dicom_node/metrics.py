"""The listener's own counters, kept in the ``serve`` process for Prometheus and the dashboard.

The SCP (:mod:`dicom_node.net.scp`) reports every C-STORE and every association here; the
admin console (:mod:`dicom_node.console.prometheus`) exposes :data:`REGISTRY` at ``/metrics``
beside what it reads from the database at scrape time (jobs, stages, sends: the worker is a
separate process, perhaps on another machine, so its figures live in the database, not here).

No label ever carries patient data, a UID or a calling AE title (which a sender chooses freely
when the allow-list is empty): only the fixed values of :class:`StoreResult` and
:class:`AssociationResult`. prometheus_client's metrics are thread-safe; the daily tally has
its own lock.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from datetime import date

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from dicom_node.states import AssociationResult, StoreResult

# No ``*_created`` series: they would double the page and nobody reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
"""The in-process metrics of this ``serve`` process (one per process, like its logger)."""

STORE_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds from a C-STORE's dataset in hand to its answer (write, fsync, index)."""

INSTANCES_RECEIVED = Counter(
    "dicom_node_instances_received",
    "C-STORE requests received, by result (stored, duplicate: identical re-send, failed)",
    ["result"],
    registry=REGISTRY,
)
ASSOCIATIONS = Counter(
    "dicom_node_associations",
    "Associations from senders, by how they ended (released, aborted, rejected)",
    ["result"],
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "dicom_node_received_bytes",
    "Bytes of instances stored (as received, file meta included)",
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "dicom_node_store_seconds",
    "Time to store one received instance durably and index it, until the answer",
    buckets=STORE_LATENCY_BUCKETS,
    registry=REGISTRY,
)

for _result in StoreResult:  # every label value present from the start (rates work at once)
    INSTANCES_RECEIVED.labels(result=str(_result))
for _assoc in AssociationResult:
    ASSOCIATIONS.labels(result=str(_assoc))


class _DailyTally:
    """Associations of the current local day, by result (the dashboard's "today")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._day = date.today()
        self._counts: Tally[AssociationResult] = Tally()

    def add(self, result: AssociationResult) -> None:
        with self._lock:
            self._roll()
            self._counts[result] += 1

    def today(self) -> dict[str, int]:
        with self._lock:
            self._roll()
            return {str(r): self._counts[r] for r in AssociationResult}

    def _roll(self) -> None:
        today = date.today()
        if today != self._day:
            self._day = today
            self._counts.clear()


_TODAY = _DailyTally()


def instance_received(result: StoreResult, seconds: float, size: int = 0) -> None:
    """Count one C-STORE answered after ``seconds``; ``size`` bytes when it was stored."""
    INSTANCES_RECEIVED.labels(result=str(result)).inc()
    STORE_SECONDS.observe(seconds)
    if size > 0:
        BYTES_RECEIVED.inc(size)


def association_ended(result: AssociationResult) -> None:
    """Count one association that ended (or was refused) with ``result``."""
    ASSOCIATIONS.labels(result=str(result)).inc()
    _TODAY.add(result)


def associations_today() -> dict[str, int]:
    """Associations of the current local day in this process, by result."""
    return _TODAY.today()
