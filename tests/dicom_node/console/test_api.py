"""REST API: authentication, the configuration round trip, jobs, retry/cancel, echo, preview."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dicom_node.models import Job
from dicom_node.states import JobState
from tests.peers import dcmtk, free_port, port_open, wait_until
from tests.support.console import (
    AUTH,
    QUALITY,
    WARNING,
    Console,
    make_console,
    make_finished_job,
)


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    c = make_console(tmp_path)
    yield c
    c.close()


def test_no_credentials_401_with_basic_challenge(console: Console) -> None:
    for method, path in (("GET", "/api/config"), ("GET", "/api/jobs"), ("PUT", "/api/config")):
        r = console.client.request(method, path, json={} if method == "PUT" else None)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Basic")
    r = console.client.get("/api/jobs", auth=("admin", "wrong password!"))
    assert r.status_code == 401


def test_no_password_set_means_no_admin(tmp_path: Path) -> None:
    c = make_console(tmp_path, password=None)
    try:
        assert c.client.get("/api/jobs", auth=("admin", "")).status_code == 401
        assert c.client.get("/api/jobs", auth=AUTH).status_code == 401
        page = c.client.get("/")
        assert page.status_code == 401 and "admin set-password" in page.text
    finally:
        c.close()


def test_get_config_is_the_file_and_put_of_it_changes_nothing(console: Console) -> None:
    before = console.config_path.read_bytes()
    r = console.client.get("/api/config", auth=AUTH)
    assert r.status_code == 200
    assert r.json() == yaml.safe_load(before)  # as written: storage.root not resolved further
    etag = r.headers["etag"]
    put = console.client.put("/api/config", json=r.json(), auth=AUTH, headers={"If-Match": etag})
    assert put.status_code == 200, put.text
    assert put.json()["changed"] is False
    assert console.config_path.read_bytes() == before


def test_put_invalid_port_is_422_with_the_key_and_changes_nothing(console: Console) -> None:
    data = console.client.get("/api/config", auth=AUTH).json()
    before = console.config_path.read_bytes()
    data["destinations"] = {"TPS": {"ae_title": "ECLIPSE", "host": "10.1.2.3", "port": 70000}}
    data["node"]["allowed_calling_aets"] = ["OK_AE", "BAD\\AE"]
    r = console.client.put("/api/config", json=data, auth=AUTH)
    assert r.status_code == 422, r.text
    keys = {e["key"] for e in r.json()["errors"]}
    assert keys == {"destinations.TPS.port", "node.allowed_calling_aets.1"}
    assert console.config_path.read_bytes() == before
    assert console.watcher.current.destinations == {}


def test_put_valid_config_is_saved_applied_and_keeps_comments(console: Console) -> None:
    text = console.config_path.read_text()
    console.config_path.write_text("# site config: do not remove this line\n" + text)
    data = console.client.get("/api/config", auth=AUTH).json()
    data["destinations"] = {"TPS": {"ae_title": "ECLIPSE", "host": "10.1.2.3", "port": 104}}
    data["routing"] = {"send_to": ["TPS"]}
    data["node"]["allowed_calling_aets"] = ["CT_SIM", "MR_3T"]
    r = console.client.put("/api/config", json=data, auth=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["changed"] and body["applied"]
    assert any(line.startswith("destinations.TPS added") for line in body["diff"])
    saved = console.config_path.read_text()
    assert saved.startswith("# site config: do not remove this line\n")
    assert yaml.safe_load(saved) == data
    current = console.watcher.current
    assert current.destinations["TPS"].port == 104
    assert current.node.allowed_calling_aets == ["CT_SIM", "MR_3T"]
    assert current.routing.send_to == ["TPS"]


def test_put_with_stale_version_is_409(console: Console) -> None:
    r = console.client.get("/api/config", auth=AUTH)
    etag = r.headers["etag"]
    console.config_path.write_text(console.config_path.read_text() + "\n# edited over SSH\n")
    put = console.client.put("/api/config", json=r.json(), auth=AUTH, headers={"If-Match": etag})
    assert put.status_code == 409
    assert "# edited over SSH" in console.config_path.read_text()


def test_put_routing_to_unknown_destination_names_routing(console: Console) -> None:
    data = console.client.get("/api/config", auth=AUTH).json()
    data["routing"] = {"send_to": ["NOWHERE"]}
    r = console.client.put("/api/config", json=data, auth=AUTH)
    assert r.status_code == 422
    assert [e["key"] for e in r.json()["errors"]] == ["routing.send_to"]


def test_effective_config_resolves_paths(console: Console) -> None:
    r = console.client.get("/api/config/effective", auth=AUTH)
    assert r.status_code == 200
    assert Path(r.json()["storage"]["root"]).is_absolute()
    assert r.json()["destinations"] == {}


def test_jobs_list_detail_preview(console: Console) -> None:
    job_id = make_finished_job(console.node)
    rows = console.client.get("/api/jobs", auth=AUTH).json()
    assert [r["id"] for r in rows] == [job_id]
    assert rows[0]["stage_seconds"] == {"register": 7.0, "fuse": 4.5, "derive": 3.0, "send": 1.5}
    detail = console.client.get(f"/api/jobs/{job_id}", auth=AUTH).json()
    assert detail["quality"] == QUALITY and detail["warnings"] == [WARNING]
    assert "3 days before the CT" in detail["pairing_reason"]
    assert {s["destination"]: s["state"] for s in detail["sends"]} == {
        "PACS": "done",
        "TPS": "failed",
    }
    assert detail["has_preview"] is True
    png = console.client.get(f"/api/jobs/{job_id}/preview.png", auth=AUTH)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert console.client.get("/api/jobs?state=failed", auth=AUTH).json() == []
    assert console.client.get("/api/jobs/999", auth=AUTH).status_code == 404
    assert console.client.get("/api/jobs?state=nonsense", auth=AUTH).status_code == 422


def test_retry_and_cancel(console: Console) -> None:
    job_id = make_finished_job(console.node, state=JobState.FAILED, error="send to TPS failed")
    cancel = console.client.post(f"/api/jobs/{job_id}/cancel", auth=AUTH)
    assert cancel.status_code == 409  # already finished
    retry = console.client.post(f"/api/jobs/{job_id}/retry", auth=AUTH)
    assert retry.status_code == 200 and retry.json()["state"] == "queued"
    assert console.client.post(f"/api/jobs/{job_id}/retry", auth=AUTH).status_code == 409
    cancel = console.client.post(f"/api/jobs/{job_id}/cancel", auth=AUTH)
    assert cancel.status_code == 200 and cancel.json()["state"] == "cancelled"
    with console.node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.CANCELLED
    assert console.client.post("/api/jobs/999/retry", auth=AUTH).status_code == 404


def test_status_has_dashboard_figures(console: Console) -> None:
    make_finished_job(console.node)
    body = console.client.get("/api/status", auth=AUTH).json()
    assert body["jobs_by_state"]["done"] == 1
    assert body["worker_alive"] is True
    assert body["disk"]["free_bytes"] > 0
    assert set(body["associations_today"]) == {"released", "aborted", "rejected"}


def test_openapi_served_without_cdn_docs(console: Console) -> None:
    spec = console.client.get("/api/openapi.json").json()
    for path in ("/api/config", "/api/jobs", "/api/jobs/{job_id}/retry", "/metrics", "/readyz"):
        assert path in spec["paths"], path
    assert console.client.get("/docs").status_code in (401, 404)


@pytest.mark.peers
def test_echo_a_real_dcmtk_peer_and_an_absent_one(console: Console, tmp_path: Path) -> None:
    port = free_port()
    peer = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "ECHOPEER", "--output-directory", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), timeout=20, what="DCMTK storescp")
        data = console.client.get("/api/config", auth=AUTH).json()
        data["destinations"] = {
            "PEER": {"ae_title": "ECHOPEER", "host": "127.0.0.1", "port": port},
            "GONE": {"ae_title": "GONE", "host": "127.0.0.1", "port": free_port()},
        }
        assert console.client.put("/api/config", json=data, auth=AUTH).status_code == 200
        ok = console.client.post("/api/destinations/PEER/echo", auth=AUTH).json()
        assert ok["ok"] is True and "success" in ok["message"]
        bad = console.client.post("/api/destinations/GONE/echo", auth=AUTH).json()
        assert bad["ok"] is False and "GONE" in bad["message"]
        assert console.client.post("/api/destinations/NONE/echo", auth=AUTH).status_code == 404
    finally:
        peer.terminate()
        peer.wait(10)
