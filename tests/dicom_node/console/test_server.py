"""The console's server thread: serves, stops, and never stops the node when it cannot listen."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from dicom_node.config_watcher import ConfigWatcher
from dicom_node.console.server import start_console
from tests.peers import free_port
from tests.peers.console import fetch
from tests.support.indexed import make_indexed_node


def test_serves_and_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.console")
    port = free_port()
    node = make_indexed_node(tmp_path, http={"host": "127.0.0.1", "port": port})
    path = tmp_path / "node.yaml"
    server = start_console(
        node.config,
        path,
        watcher=ConfigWatcher(path, node.config),
        sessions=node.sessions,
        worker_alive=lambda: True,
    )
    try:
        assert server is not None and server.port == port
        status, body, _ = fetch(f"http://127.0.0.1:{port}/healthz", password=None)
        assert (status, body) == (200, b'{"status":"ok"}')
        assert fetch(f"http://127.0.0.1:{port}/api/jobs", password=None)[0] == 401
        assert "no password set" in caplog.text  # nobody can log in yet: said at start
    finally:
        if server is not None:
            server.stop()
        node.close()
    with pytest.raises(OSError):
        fetch(f"http://127.0.0.1:{port}/healthz", password=None)


def test_port_taken_is_logged_and_the_node_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = make_indexed_node(tmp_path, http={"host": "127.0.0.1", "port": port})
        path = tmp_path / "node.yaml"
        try:
            server = start_console(
                node.config,
                path,
                watcher=ConfigWatcher(path, node.config),
                sessions=node.sessions,
                worker_alive=lambda: True,
            )
        finally:
            node.close()
    assert server is None
    assert "runs without its console" in caplog.text


def test_no_http_section_no_console(tmp_path: Path) -> None:
    node = make_indexed_node(tmp_path)
    try:
        path = tmp_path / "node.yaml"
        watcher = ConfigWatcher(path, node.config)
        server = start_console(
            node.config, path, watcher=watcher, sessions=node.sessions, worker_alive=lambda: None
        )
        assert server is None
    finally:
        node.close()
