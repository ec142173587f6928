"""The application's defences: security headers, no CDN, static files, errors as pages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.console.render import PAGES_DIR, STATIC_DIR
from tests.support.console import Console, make_console


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    c = make_console(tmp_path)
    yield c
    c.close()


def test_security_headers_and_no_caching(console: Console) -> None:
    r = console.client.get("/login")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    css = console.client.get("/static/console.css")
    assert css.status_code == 200 and "cache-control" not in css.headers
    assert console.client.get("/static/console.js").status_code == 200


def test_nothing_loaded_from_elsewhere() -> None:
    """Works offline: no page or script refers to another host, no inline script or style."""
    for path in [*PAGES_DIR.glob("*.html"), *STATIC_DIR.iterdir()]:
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
        if path.suffix == ".html":
            assert "<script>" not in text and 'style="' not in text and "<style" not in text, path


def test_unknown_page_is_an_html_error(console: Console) -> None:
    console.login()
    r = console.client.get("/config/destinations/NOPE")
    assert r.status_code == 404 and "<html" in r.text and "NOPE" in r.text
    api = console.client.get("/api/nope")
    assert api.status_code == 404 and api.json()["detail"]
