"""``dicom-node`` as a real process: config files, start, stop, logs, and views of its index.

Every test that needs a running node starts it through :func:`start_node` (in its own process
group, so a kill takes its worker too) and talks to it with real DCMTK peers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit import read_log
from dicom_node.config import NodeConfig, read_config_file
from dicom_node.db import make_engine, session_factory
from dicom_node.models import Job, Send
from dicom_node.states import JobState
from tests.peers import dcmtk_tools, free_port, port_open, wait_until

NODE_AET = "FUSIONNODE"
START_TIMEOUT = 60.0
JOB_TIMEOUT = 240.0

FAST_ORCHESTRATION: dict[str, dict[str, Any]] = {
    "pairing": {"series_quiet_seconds": 1.0, "min_slices": 20, "max_days_between": 90},
    "jobs": {"max_attempts": 3, "retry_backoff_seconds": 0.5},
    "worker": {"device": "cpu", "threads": 1, "poll_seconds": 0.2},
}
"""Config sections that make a test node complete series, pair and retry within seconds."""


def node_command(*args: str) -> list[str]:
    """The ``dicom-node`` command line run with this interpreter."""
    return [sys.executable, "-m", "dicom_node.cli", *args]


def node_config(root: Path, *, port: int | None = None, **sections: Any) -> dict[str, Any]:
    """A test config dict on 127.0.0.1 with storage under ``root`` (sections merged on top)."""
    cfg: dict[str, Any] = {
        "node": {
            "ae_title": NODE_AET,
            "host": "127.0.0.1",
            "port": port or free_port(),
            "shutdown_timeout_seconds": 30,
        },
        "storage": {"root": str(root / "storage"), "min_free_mb": 1},
        "logging": {"level": "INFO"},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **value}
        else:
            cfg[name] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any] | str) -> Path:
    """Replace a config file atomically, as an editor would on save."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, path)
    return path


@dataclass
class NodeProcess:
    """A ``dicom-node`` process (serve or worker) with its config file and log."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        """The DICOM port from the node's config."""
        return int(self.config["node"]["port"])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port from the node's config (None without ``node.tls``)."""
        tls = self.config["node"].get("tls")
        return int(tls["port"]) if tls else None

    @property
    def listen_port(self) -> int:
        """A port the node listens on: the plain one, else the TLS one."""
        port = self.config["node"].get("port") or self.tls_port
        assert port is not None, "node listens nowhere"
        return int(port)

    @property
    def storage(self) -> Path:
        """The storage root from the node's config."""
        return Path(self.config["storage"]["root"])

    @property
    def db_url(self) -> str:
        """SQLAlchemy URL of the node's index."""
        return self.node_config().database_url

    def node_config(self) -> NodeConfig:
        """The config as the node reads it."""
        return read_config_file(self.config_path)

    def audit_path(self) -> Path:
        """The node's audit log (JSON lines)."""
        cfg = self.node_config()
        return cfg.audit.paths(cfg.storage.root)[0]

    def audit_records(self) -> list[dict[str, Any]]:
        """Every record of the node's audit log so far (none before the first)."""
        path = self.audit_path()
        return read_log(path) if path.exists() else []

    def log(self) -> str:
        """Everything the process logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the process's log."""
        return self.log()[-chars:] if self.log_path.exists() else ""

    def write_config(self, cfg: dict[str, Any] | str) -> None:
        """Replace the node's config file (the node reloads it)."""
        write_config(self.config_path, cfg)
        if not isinstance(cfg, str):
            self.config = cfg

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit code; SIGKILL the process group after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.wait(10))

    def kill(self) -> None:
        """SIGKILL the whole process group (the node and its worker)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def echoscu(self, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
        """Run DCMTK echoscu against the node."""
        return dcmtk_tools.echoscu(self.port, calling=calling, called=NODE_AET)

    def storescu(
        self, *files: Path | str, calling: str = "MODALITY", extra: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run DCMTK storescu (verbose) sending ``files`` to the node."""
        return dcmtk_tools.storescu(
            self.port, *files, calling=calling, called=NODE_AET, extra=extra
        )


def start_node(
    workdir: Path,
    cfg: dict[str, Any],
    *,
    command: str = "serve",
    log_name: str | None = None,
    wait_for_port: bool = True,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> NodeProcess:
    """Write ``cfg`` to ``workdir/node.yaml`` and start ``dicom-node COMMAND`` on it.

    ``prefix``: a command the node is started under (e.g. :func:`tests.peers.hosts.as_host`).
    """
    config_path = write_config(workdir / "node.yaml", cfg)
    log_path = workdir / (log_name or f"{command}.log")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*prefix, *node_command(command, "--config", str(config_path))],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=full_env,
            start_new_session=True,
        )
    node = NodeProcess(proc, config_path, log_path, cfg)
    if wait_for_port:
        _wait_listening(node)
    return node


def _wait_listening(node: NodeProcess) -> None:
    def ready() -> bool:
        if node.proc.poll() is not None:
            raise RuntimeError(f"node exited with {node.proc.returncode}:\n{node.log()}")
        return port_open(node.listen_port)

    try:
        wait_until(ready, timeout=START_TIMEOUT, what="dicom-node serve to listen")
    except Exception:
        node.kill()
        raise


class IndexView:
    """Read-only views of a running node's index, for assertions."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.engine: Engine = make_engine(node.node_config().database_url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)

    def jobs(self) -> list[Job]:
        """Every job, with its sends and stages loaded."""
        with self.sessions() as s:
            found = list(s.scalars(select(Job).order_by(Job.id)).all())
            for j in found:
                _ = (j.sends, j.stages)  # load while the session is open
            return found

    def sends(self) -> list[Send]:
        """Every send row."""
        with self.sessions() as s:
            return list(s.scalars(select(Send).order_by(Send.id)).all())

    def wait_jobs(
        self,
        n: int,
        states: tuple[JobState, ...] = (JobState.DONE,),
        timeout: float = JOB_TIMEOUT,
    ) -> list[Job]:
        """Wait until ``n`` jobs exist and all are in ``states`` (a failure fails fast)."""

        def ready() -> list[Job] | None:
            if self.node.proc.poll() is not None:
                raise RuntimeError(f"node exited:\n{self.node.log_tail()}")
            found = self.jobs()
            if JobState.FAILED not in states and any(j.state == JobState.FAILED for j in found):
                raise AssertionError(
                    f"job failed: {[(j.id, j.error) for j in found]}\n{self.node.log_tail()}"
                )
            return found if len(found) >= n and all(j.state in states for j in found) else None

        try:
            return wait_until(ready, timeout=timeout, interval=0.3, what=f"{n} job(s) {states}")
        except TimeoutError as exc:
            raise TimeoutError(
                f"{exc}\njobs: {[(j.id, j.state, j.error) for j in self.jobs()]}"
                f"\n{self.node.log_tail()}"
            ) from None

    def close(self) -> None:
        """Release the engine."""
        self.engine.dispose()
