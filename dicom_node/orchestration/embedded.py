"""The worker process ``dicom-node serve`` starts beside its listener, and restarts when it dies.

The worker is a separate process, so a crash or an out-of-memory kill during fusion never
touches the associations in progress. It is a plain child process running
``python -m dicom_node.cli worker --embedded-by <serve's pid>`` (not :mod:`multiprocessing`,
which would add a resource-tracker process that outlives a killed parent): ``serve`` hands it
the config it runs on through its standard input, and the worker exits within seconds when
``serve`` dies, however it dies (SIGKILL, an OOM kill), so no orphan keeps claiming jobs with a
stale config (see :mod:`dicom_node.orchestration.parent`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from dicom_node.config import NodeConfig

log = logging.getLogger(__name__)

EMBEDDED_FLAG = "--embedded-by"
"""``dicom-node worker`` option naming the parent process (hidden from ``--help``)."""


def worker_command(config_file: Path | None) -> list[str]:
    """The command line of an embedded worker of this process."""
    cmd = [sys.executable, "-m", "dicom_node.cli", "worker", EMBEDDED_FLAG, str(os.getpid())]
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    return cmd


def handover(config: NodeConfig, signature: str | None) -> bytes:
    """What serve writes to the worker's standard input: the config and its file signature."""
    payload = {"config": config.model_dump(mode="json"), "signature": signature}
    return json.dumps(payload).encode("utf-8")


def read_handover(data: bytes) -> tuple[NodeConfig, str | None]:
    """The worker's side of :func:`handover`."""
    payload = json.loads(data.decode("utf-8"))
    return NodeConfig.model_validate(payload["config"]), payload.get("signature")


class EmbeddedWorker:
    """The worker process ``dicom-node serve`` starts and restarts when it dies."""

    def __init__(
        self, config: NodeConfig, config_file: Path | None = None, signature: str | None = None
    ) -> None:
        """Prepare (not start) a worker for ``config``; ``config_file`` is watched by it."""
        self.config = config
        self.config_file = config_file
        self.signature = signature
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """Process id of the running worker, if any."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """The worker process is running (the console's readiness check asks)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the worker process (it logs to the same standard error as serve)."""
        self._stopping = False
        proc = subprocess.Popen(worker_command(self.config_file), stdin=subprocess.PIPE)
        assert proc.stdin is not None
        try:
            proc.stdin.write(handover(self.config, self.signature))
            proc.stdin.close()
        except BrokenPipeError:
            log.error("embedded worker (pid %s) exited before reading its config", proc.pid)
        self._proc = proc
        log.info("embedded worker started (pid %s)", proc.pid)

    def supervise(self) -> None:
        """Restart the worker when it died (crash, OOM kill); call periodically."""
        proc = self._proc
        if self._stopping or proc is None or proc.poll() is None:
            return
        self.restarts += 1
        log.error(
            "embedded worker (pid %s) died with exit code %s: restarting (restart %d)",
            proc.pid,
            proc.returncode,
            self.restarts,
        )
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the worker (it hands its job back) and wait; SIGKILL after ``timeout``."""
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.info("embedded worker stopped (exit code %s)", proc.returncode)
