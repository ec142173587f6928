"""/metrics: the listener's counters after real C-STOREs, and figures read from the database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.console.prometheus import STAGE_BUCKETS, DatabaseCollector
from tests.peers.console import fetch, http_section, wait_console
from tests.peers.node import NodeProcess
from tests.support.console import make_finished_job
from tests.support.data import SMALL_CT, fixture_files, require_small_fixtures
from tests.support.indexed import IndexedNode

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.peers
@pytest.mark.slow
def test_metrics_after_a_real_c_store(node_factory: Callable[..., NodeProcess]) -> None:
    require_small_fixtures()
    files = fixture_files(SMALL_CT)
    node = node_factory(node={"allowed_calling_aets": ["CT_SIM"]}, http=http_section())
    url = wait_console(node)
    status, body, headers = fetch(url + "/metrics", password=None)  # no login needed
    assert status == 200 and headers["content-type"].startswith("text/plain")
    before = _samples(body.decode())
    assert _get(before, "dicom_node_instances_received_total", result="stored") == 0

    proc = node.storescu(*files, calling="CT_SIM")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    refused = node.echoscu(calling="STRANGER")
    assert refused.returncode != 0

    after = _samples(fetch(url + "/metrics", password=None)[1].decode())
    n = len(files)
    assert _get(after, "dicom_node_instances_received_total", result="stored") == n
    assert _get(after, "dicom_node_instances_received_total", result="failed") == 0
    assert _get(after, "dicom_node_store_seconds_count") == n
    assert 0 < _get(after, "dicom_node_store_seconds_sum") < 60
    received = _get(after, "dicom_node_received_bytes_total")
    assert received >= 0.95 * sum(f.stat().st_size for f in files)
    assert _get(after, "dicom_node_associations_total", result="released") == 1
    assert _get(after, "dicom_node_associations_total", result="rejected") == 1
    assert _get(after, "dicom_node_series", state="receiving") == 1
    assert _get(after, "dicom_node_disk_free_bytes") > 0
    assert _get(after, "dicom_node_worker_up") == 1
    assert _get(after, "dicom_node_database_up") == 1
    text = fetch(url + "/metrics", password=None)[1].decode()
    assert "MRI-DIR" not in text and "CT_SIM" not in text  # no patient data, no AE labels


def test_database_figures(indexed_node: IndexedNode) -> None:
    make_finished_job(indexed_node)
    collector = DatabaseCollector(indexed_node.sessions, lambda: indexed_node.config, lambda: None)
    samples: Samples = {}
    for family in collector.collect():
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert _get(samples, "dicom_node_jobs", state="done") == 1
    assert _get(samples, "dicom_node_jobs", state="failed") == 0
    assert _get(samples, "dicom_node_job_stage_seconds_count", stage="register") == 1
    assert _get(samples, "dicom_node_job_stage_seconds_sum", stage="fuse") == 4.5
    assert _get(samples, "dicom_node_job_stage_seconds_bucket", stage="fuse", le="5.0") == 1
    assert _get(samples, "dicom_node_job_stage_seconds_bucket", stage="fuse", le="2.0") == 0
    assert _get(samples, "dicom_node_job_stage_seconds_bucket", stage="send", le="+Inf") == 1
    assert _get(samples, "dicom_node_send_failures_total", destination="TPS") == 1
    assert _get(samples, "dicom_node_send_failures_total", destination="PACS") == 0
    assert _get(samples, "dicom_node_sends", destination="PACS", state="done") == 1
    assert ("dicom_node_worker_up", ()) not in samples  # unknown for external workers
    assert len(STAGE_BUCKETS) + 1 == sum(
        1 for (name, labels) in samples if name.endswith("_bucket") and ("stage", "fuse") in labels
    )


def test_database_down_is_reported_not_raised(tmp_path: Path, indexed_node: IndexedNode) -> None:
    from dicom_node.db import make_engine, session_factory

    folder = tmp_path / "a-folder"
    folder.mkdir()
    engine = make_engine(f"sqlite:///{folder}")
    try:
        collector = DatabaseCollector(
            session_factory(engine), lambda: indexed_node.config, lambda: True
        )
        names = {s.name: s.value for family in collector.collect() for s in family.samples}
    finally:
        engine.dispose()
    assert names["dicom_node_database_up"] == 0
    assert names["dicom_node_worker_up"] == 1 and "dicom_node_jobs" not in names
