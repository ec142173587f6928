"""The listener's counters: results, bytes, latency, today's associations."""

from __future__ import annotations

from dicom_node import metrics
from dicom_node.states import AssociationResult, StoreResult


def _value(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_instances_bytes_and_latency_counted() -> None:
    stored = _value("dicom_node_instances_received_total", result="stored")
    failed = _value("dicom_node_instances_received_total", result="failed")
    nbytes = _value("dicom_node_received_bytes_total")
    count = _value("dicom_node_store_seconds_count")
    metrics.instance_received(StoreResult.STORED, 0.004, 1000)
    metrics.instance_received(StoreResult.FAILED, 0.3)
    assert _value("dicom_node_instances_received_total", result="stored") == stored + 1
    assert _value("dicom_node_instances_received_total", result="failed") == failed + 1
    assert _value("dicom_node_received_bytes_total") == nbytes + 1000
    assert _value("dicom_node_store_seconds_count") == count + 2
    assert _value("dicom_node_store_seconds_bucket", le="0.005") >= 1


def test_associations_counted_and_tallied_today() -> None:
    before = metrics.associations_today()
    total = _value("dicom_node_associations_total", result="rejected")
    metrics.association_ended(AssociationResult.REJECTED)
    metrics.association_ended(AssociationResult.RELEASED)
    after = metrics.associations_today()
    assert after["rejected"] == before["rejected"] + 1
    assert after["released"] == before["released"] + 1
    assert _value("dicom_node_associations_total", result="rejected") == total + 1
    assert set(after) == {"released", "aborted", "rejected"}
