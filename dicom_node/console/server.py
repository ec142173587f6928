"""The console's HTTP server inside ``dicom-node serve``: uvicorn in a background thread.

:func:`start_console` is the one hook ``serve`` calls when the config has an ``http`` section.
If the HTTP port cannot be bound the error is logged and the node goes on receiving DICOM:
a console problem must never stop images from arriving.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.config_watcher import ConfigWatcher
from dicom_node.console.app import create_app
from dicom_node.console.auth import PasswordStore, SessionStore
from dicom_node.console.configedit import ConfigFile
from dicom_node.console.context import ConsoleContext
from dicom_node.errors import NetworkError

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0


class ConsoleServer:
    """uvicorn serving one application on host:port from a daemon thread."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        """Prepare (not start) the server."""
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # keep the node's logging set-up
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.host = host

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        servers = getattr(self._server, "servers", None) or []
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start serving; :class:`NetworkError` when the port cannot be bound in time."""
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="console-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise NetworkError(
                    f"admin console cannot listen on {self.host}:{self._server.config.port}"
                )
            time.sleep(0.02)

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind: start() says
            self._server.run()

    def stop(self) -> None:
        """Stop serving (requests in progress get a moment to finish)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            self._thread = None


def start_console(
    config: NodeConfig,
    config_path: Path,
    *,
    watcher: ConfigWatcher,
    sessions: sessionmaker[Session],
    worker_alive: Callable[[], bool | None],
    overrides: Mapping[str, Any] | None = None,
) -> ConsoleServer | None:
    """Serve the console as ``config.http`` says; None (error logged) when it cannot listen."""
    http = config.http
    if http is None:
        return None
    ctx = ConsoleContext(
        config_file=ConfigFile(config_path, watcher, overrides, started=config),
        sessions=sessions,
        passwords=PasswordStore(config.password_file),
        worker_alive=worker_alive,
        web_sessions=SessionStore(http.session_idle_minutes * 60.0),
    )
    server = ConsoleServer(create_app(ctx), http.host, http.port)
    try:
        server.start()
    except NetworkError as exc:
        log.error("%s: the node runs without its console", exc)
        return None
    if not ctx.passwords.has_users():
        log.warning(
            "admin console: no password set in %s; nobody can log in until "
            "`dicom-node admin set-password`",
            config.password_file,
        )
    log.info("admin console on http://%s:%d/ (metrics at /metrics)", http.host, server.port)
    ctx.recent.install()  # from now on, warnings show on the dashboard
    return server
