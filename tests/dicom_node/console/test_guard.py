"""Who may ask: login form, session cookie, CSRF tokens, cross-site refusal, login rate limit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.console.auth import LoginLimiter
from dicom_node.console.guard import CSRF_HEADER, SESSION_COOKIE
from tests.support.console import AUTH, Console, make_console, make_finished_job


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    c = make_console(tmp_path, limiter=LoginLimiter(per_client=3, per_user=50, window=60))
    yield c
    c.close()


def test_login_sets_httponly_strict_cookie_and_opens_pages(console: Console) -> None:
    assert console.client.get("/jobs").status_code == 401
    r = console.login()
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert SESSION_COOKIE in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert console.client.get("/jobs").status_code == 200


def test_login_without_its_form_token_refused(console: Console) -> None:
    r = console.client.post(
        "/login", data={"username": "admin", "password": AUTH[1], "login_token": "forged"}
    )
    assert r.status_code == 403
    assert console.client.get("/jobs").status_code == 401


def test_login_next_never_leaves_the_site(console: Console) -> None:
    page = console.client.get("/login")
    token = page.text.split('name="login_token" value="')[1].split('"')[0]
    r = console.client.post(
        "/login",
        data={
            "username": "admin",
            "password": AUTH[1],
            "login_token": token,
            "next": "//evil.example.org/x",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_page_change_needs_csrf_token(console: Console) -> None:
    job_id = make_finished_job(console.node)
    console.login()
    r = console.client.post(f"/jobs/{job_id}/retry", data={"csrf_token": "wrong"})
    assert r.status_code == 403
    tokens = console.form_tokens(f"/jobs/{job_id}")
    r = console.client.post(f"/jobs/{job_id}/retry", data={"csrf_token": tokens["csrf_token"]})
    assert r.status_code == 200 and "queued again" in r.text


def test_cross_site_change_refused_even_with_basic(console: Console) -> None:
    job_id = make_finished_job(console.node)
    r = console.client.post(
        f"/api/jobs/{job_id}/retry", auth=AUTH, headers={"Origin": "https://evil.example.org"}
    )
    assert r.status_code == 403
    r = console.client.post(
        f"/api/jobs/{job_id}/retry", auth=AUTH, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert r.status_code == 403
    r = console.client.post(
        f"/api/jobs/{job_id}/retry", auth=AUTH, headers={"Origin": "http://testserver"}
    )
    assert r.status_code == 200


def test_api_through_session_cookie_needs_csrf_header(console: Console) -> None:
    job_id = make_finished_job(console.node)
    console.login()
    assert console.client.get("/api/jobs").status_code == 200  # reading needs no token
    assert console.client.post(f"/api/jobs/{job_id}/retry").status_code == 403
    csrf = console.form_tokens("/jobs/1")["csrf_token"]
    r = console.client.post(f"/api/jobs/{job_id}/retry", headers={CSRF_HEADER: csrf})
    assert r.status_code == 200


def test_failed_logins_rate_limited_and_logged(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.console")
    for _ in range(3):
        assert console.client.get("/api/jobs", auth=("admin", "wrong guess")).status_code == 401
    limited = console.client.get("/api/jobs", auth=AUTH)  # even the right password waits
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    page = console.login()
    assert page.status_code == 429 and "too many failed logins" in page.text
    failures = [r for r in caplog.records if "login-failed" in r.getMessage()]
    assert len(failures) >= 4 and all(r.levelno == logging.WARNING for r in failures)
    assert "testclient" in failures[0].getMessage()  # the client's address is logged
    assert "wrong guess" not in caplog.text  # never the password


def test_logout_ends_the_session(console: Console) -> None:
    console.login()
    csrf = console.form_tokens("/")["csrf_token"]
    r = console.client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert console.client.get("/jobs").status_code == 401
