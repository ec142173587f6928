"""The admin console of a real ``dicom-node serve``, and Debian's Chromium driven by Playwright.

Browsers: Debian's ``chromium`` package (``/usr/bin/chromium``), never a browser Playwright
downloads; tests skip with the package to install when it or the Python ``playwright`` package
is missing. Every launch is headless, sandbox-less (tests run as root in CI) and without any
network of its own (no component updates, sync or background requests).
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.peers import free_port, wait_until
from tests.peers.node import NodeProcess, node_command

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

PASSWORD = "console-test-password"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)
HTTP_TIMEOUT = 30.0


def http_section(port: int | None = None) -> dict[str, Any]:
    """A config ``http`` section on 127.0.0.1 and a free port."""
    return {"host": "127.0.0.1", "port": port or free_port()}


def set_password(config_path: Path, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    """Run ``dicom-node admin set-password`` with the password on standard input."""
    return subprocess.run(
        node_command("admin", "set-password", "--config", str(config_path)),
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def base_url(node: NodeProcess) -> str:
    """``http://127.0.0.1:PORT`` of a node's console."""
    return f"http://127.0.0.1:{int(node.config['http']['port'])}"


def fetch(
    url: str,
    *,
    method: str = "GET",
    body: Any = None,
    password: str | None = PASSWORD,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP request (Basic auth as admin unless ``password`` is None): status, body and
    headers (lower-case names). Error statuses are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if password is not None:
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as rsp:
            return rsp.status, rsp.read(), {k.lower(): v for k, v in rsp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}


def wait_console(node: NodeProcess) -> str:
    """Wait until the node's console answers ``/healthz``; its base URL."""
    url = base_url(node)

    def up() -> bool:
        if node.proc.poll() is not None:
            raise RuntimeError(f"node exited:\n{node.log_tail()}")
        try:
            return fetch(url + "/healthz", password=None)[0] == 200
        except OSError:
            return False

    wait_until(up, timeout=HTTP_TIMEOUT, what="the admin console")
    return url


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (skips when either is missing)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright missing (pip install -e '.[test]')")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def login(page: Page, url: str, password: str = PASSWORD) -> None:
    """Log in through the login form and land on the dashboard."""
    page.goto(url + "/")
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Dashboard')")
