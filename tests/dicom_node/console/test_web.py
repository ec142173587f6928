"""Pages: dashboard, jobs, job detail (quality, warnings, preview, sends), retry and cancel;
patient names never shown, titles free of patient data."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.models import Patient
from dicom_node.states import JobState
from tests.support.console import WARNING, Console, make_console, make_finished_job
from tests.support.data import SMALL_CT, require_small_fixtures


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    c = make_console(tmp_path)
    c.login()
    yield c
    c.close()


def _title(html: str) -> str:
    found = re.search(r"<title>(.*?)</title>", html, re.S)
    assert found is not None
    return found.group(1)


def test_pages_need_a_session(tmp_path: Path) -> None:
    c = make_console(tmp_path)
    try:
        for path in ("/", "/jobs", "/jobs/1", "/config", "/config/node"):
            r = c.client.get(path)
            assert r.status_code == 401 and 'action="/login"' in r.text, path
    finally:
        c.close()


def test_dashboard_shows_series_jobs_disk_worker(console: Console) -> None:
    require_small_fixtures()
    n = console.node.ingest(SMALL_CT, aet="CT_SIM")
    make_finished_job(console.node, state=JobState.FAILED, error="send to TPS failed")
    html = console.client.get("/").text
    assert f">{n}<" in html  # instances received today
    assert "CT_SIM" in html and "receiving" in html
    assert "running" in html  # the worker
    assert "Disk free" in html and "GiB" in html
    assert "send to TPS failed" in html  # recent errors
    assert _title(html).startswith("Dashboard")


def test_patient_names_never_on_pages(console: Console) -> None:
    require_small_fixtures()
    console.node.ingest(SMALL_CT)
    with console.node.sessions() as s:
        names = [p.patient_name for p in s.query(Patient).all() if p.patient_name]
    assert names, "the fixture has a patient name to look for"
    job_id = make_finished_job(console.node)
    for path in ("/", "/jobs", f"/jobs/{job_id}", "/config"):
        html = console.client.get(path).text
        for name in names:
            assert name not in html, path
        page_titles = {"Dashboard", "Jobs", f"Job {job_id}", "Configuration"}
        assert _title(html).split(" · ")[0] in page_titles  # never a patient's name or ID


def test_jobs_list_filters_by_state(console: Console) -> None:
    done = make_finished_job(console.node)
    failed = make_finished_job(console.node, state=JobState.FAILED, error="boom")
    html = console.client.get("/jobs").text
    assert f'href="/jobs/{done}"' in html and f'href="/jobs/{failed}"' in html
    html = console.client.get("/jobs?state=failed").text
    assert f'href="/jobs/{failed}"' in html and f'href="/jobs/{done}"' not in html


def test_job_page_shows_pairing_quality_warnings_preview_sends(console: Console) -> None:
    job_id = make_finished_job(console.node)
    r = console.client.get(f"/jobs/{job_id}")
    assert r.status_code == 200
    html = r.text
    assert _title(html).startswith(f"Job {job_id} ·")
    assert "3 days before the CT" in html
    assert "Head mask overlap (Dice)" in html and "0.941" in html
    assert WARNING in html
    assert f'src="/jobs/{job_id}/preview.png"' in html
    assert "association rejected" in html and "70/70" in html
    assert ">Retry<" in html and ">Cancel<" not in html  # done: retry only
    png = console.client.get(f"/jobs/{job_id}/preview.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_job_page_without_outputs(console: Console) -> None:
    job_id = make_finished_job(console.node, state=JobState.FAILED, with_outputs=False)
    html = console.client.get(f"/jobs/{job_id}").text
    assert "No preview" in html
    assert console.client.get(f"/jobs/{job_id}/preview.png").status_code == 404
    r = console.client.get("/jobs/4242")
    assert r.status_code == 404 and "no job 4242" in r.text and "<html" in r.text


def test_retry_then_cancel_from_the_page(console: Console) -> None:
    job_id = make_finished_job(console.node, state=JobState.FAILED, error="boom")
    csrf = console.form_tokens(f"/jobs/{job_id}")["csrf_token"]
    html = console.client.post(f"/jobs/{job_id}/retry", data={"csrf_token": csrf}).text
    assert f"job {job_id} queued again" in html and "badge state-queued" in html
    html = console.client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": csrf}).text
    assert f"job {job_id} cancelled" in html
    assert (
        console.client.post(f"/jobs/{job_id}/explode", data={"csrf_token": csrf}).status_code == 404
    )
