"""The worker process ``dicom-node serve`` starts beside its listener, and restarts when it dies.

The worker is a separate process (spawned, so it shares no threads or locks with the SCP): a
crash or an out-of-memory kill during fusion never touches the associations in progress.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig

log = logging.getLogger(__name__)


def _embedded_entry(config: NodeConfig, config_file: Path | None) -> None:
    from dicom_node.logs import setup_logging
    from dicom_node.orchestration.worker import main

    setup_logging(config.logging)
    raise SystemExit(main(config, config_file))


class EmbeddedWorker:
    """The worker process ``dicom-node serve`` starts and restarts when it dies."""

    def __init__(self, config: NodeConfig, config_file: Path | None = None) -> None:
        """Prepare (not start) a worker process for ``config``."""
        self.config = config
        self.config_file = config_file
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """Process id of the running worker, if any."""
        return None if self._proc is None else int(self._proc.pid)

    @property
    def alive(self) -> bool:
        """The worker process is running (the console's readiness check asks)."""
        return self._proc is not None and bool(self._proc.is_alive())

    def start(self) -> None:
        """Start the worker process."""
        self._stopping = False
        self._proc = self._ctx.Process(
            target=_embedded_entry,
            args=(self.config, self.config_file),
            name="dicom-node-worker",
            daemon=False,
        )
        self._proc.start()
        log.info("embedded worker started (pid %s)", self._proc.pid)

    def supervise(self) -> None:
        """Restart the worker when it died (crash, OOM kill); call periodically."""
        if self._stopping or self._proc is None or self._proc.is_alive():
            return
        code = self._proc.exitcode
        self.restarts += 1
        log.error(
            "embedded worker (pid %s) died with exit code %s: restarting (restart %d)",
            self._proc.pid,
            code,
            self.restarts,
        )
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the worker (it hands its job back) and wait; SIGKILL after ``timeout``."""
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        log.info("embedded worker stopped (exit code %s)", proc.exitcode)
