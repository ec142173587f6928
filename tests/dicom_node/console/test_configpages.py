"""Configuration pages: allowed calling AEs, destinations, routing; errors next to the field."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.peers import free_port
from tests.support.console import Console, make_console


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    c = make_console(tmp_path)
    c.login()
    yield c
    c.close()


def _field_html(html: str, name: str) -> str:
    """The HTML of one field, up to the next field (or the form's buttons)."""
    start = html.find(f'data-field="{name}"')
    assert start >= 0, name
    ends = [
        i
        for i in (html.find('<div class="field', start), html.find('class="buttons"', start))
        if i > 0
    ]
    return html[start : min(ends)]


def _add_destination(console: Console, name: str, port: str, **extra: list[str] | str) -> str:
    tokens = console.form_tokens("/config/destinations/new")
    data = {
        **tokens,
        "destination_name": name,
        "ae_title": "ECLIPSE",
        "host": "10.1.2.3",
        "port": port,
        **extra,
    }
    return console.client.post("/config/destinations/new", data=data).text


def test_add_calling_ae_applies_at_once(console: Console) -> None:
    tokens = console.form_tokens("/config/node")
    form = console.client.get("/config/node").text
    assert 'data-field="allowed_calling_aets"' in form
    data = {**tokens, "ae_title": "FUSIONNODE", "allowed_calling_aets": ["CT_SIM", "", "NEWCT"]}
    html = console.client.post("/config/node", data=data).text
    assert "Saved and applied" in html
    assert console.watcher.current.node.allowed_calling_aets == ["CT_SIM", "NEWCT"]
    saved = yaml.safe_load(console.config_path.read_text())["node"]
    assert saved["allowed_calling_aets"] == ["CT_SIM", "NEWCT"]
    assert "max_associations" not in saved  # defaults are not written into the file


def test_bad_calling_ae_shown_next_to_its_row(console: Console) -> None:
    tokens = console.form_tokens("/config/node")
    before = console.config_path.read_bytes()
    data = {
        **tokens,
        "ae_title": "FUSIONNODE",
        "allowed_calling_aets": ["GOOD", "WAY_TOO_LONG_AE_TITLE"],
    }
    r = console.client.post("/config/node", data=data)
    assert r.status_code == 422
    rows = _field_html(r.text, "allowed_calling_aets")
    assert re.search(r'value="WAY_TOO_LONG_AE_TITLE" data-index="1"[^>]*>\s*<p class="error"', rows)
    assert console.config_path.read_bytes() == before


def test_invalid_port_error_next_to_the_port_field(console: Console) -> None:
    before = console.config_path.read_bytes()
    html = _add_destination(console, "TPS", "70000")
    port = _field_html(html, "port")
    assert 'value="70000"' in port
    assert '<p class="error" role="alert">Input should be less than or equal to 65535</p>' in port
    assert 'class="error"' not in _field_html(html, "host")
    assert console.config_path.read_bytes() == before
    html = _add_destination(console, "TPS", "abc")
    assert "valid integer" in _field_html(html, "port")


def test_add_edit_echo_and_remove_a_destination(console: Console) -> None:
    html = _add_destination(console, "TPS", "104", send=["fused", "reg"])
    assert "Saved and applied" in html and 'data-destination="TPS"' in html
    assert console.watcher.current.destinations["TPS"].send == ["fused", "reg"]
    # routing: tick it
    tokens = console.form_tokens("/config")
    console.client.post("/config/routing", data={**tokens, "send_to": ["TPS"]})
    assert console.watcher.current.routing.send_to == ["TPS"]
    # edit: the name is fixed, other fields change
    tokens = console.form_tokens("/config/destinations/TPS")
    port = free_port()
    data = {
        **tokens,
        "ae_title": "ECLIPSE2",
        "host": "127.0.0.1",
        "port": str(port),
        "send": ["reg"],
    }
    console.client.post("/config/destinations/TPS", data=data)
    dest = console.watcher.current.destinations["TPS"]
    assert (dest.ae_title, dest.host, dest.port, dest.send) == (
        "ECLIPSE2",
        "127.0.0.1",
        port,
        ["reg"],
    )
    # echo: nothing listens there; the answer says so
    html = console.client.post("/config/destinations/TPS/echo", data=tokens).text
    assert f"TPS: echo ECLIPSE2@127.0.0.1:{port} failed" in html
    # remove: also from routing
    tokens = console.form_tokens("/config")
    html = console.client.post("/config/destinations/TPS/delete", data=tokens).text
    assert "destinations.TPS removed" in html
    assert console.watcher.current.destinations == {}
    assert console.watcher.current.routing.send_to == []


def test_destination_name_checked(console: Console) -> None:
    assert 'class="error"' in _field_html(_add_destination(console, "bad name!", "104"), "name")
    _add_destination(console, "TPS", "104")
    assert "exists already" in _field_html(_add_destination(console, "TPS", "104"), "name")
    assert console.client.get("/config/destinations/NOPE").status_code == 404


def test_form_over_a_changed_file_is_refused(console: Console) -> None:
    tokens = console.form_tokens("/config/node")
    console.config_path.write_text(console.config_path.read_text() + "# edited over SSH\n")
    data = {**tokens, "ae_title": "OTHER"}
    html = console.client.post("/config/node", data=data).text
    assert "changed since it was read" in html
    assert console.watcher.current.node.ae_title == "FUSIONNODE"


def test_overview_lists_allowed_aets_and_warns_when_open(console: Console) -> None:
    html = console.client.get("/config").text
    assert "anyone may send" in html
    tokens = console.form_tokens("/config/node")
    console.client.post("/config/node", data={**tokens, "allowed_calling_aets": ["CT_SIM"]})
    html = console.client.get("/config").text
    assert '<code class="aet">CT_SIM</code>' in html and "anyone may send" not in html
