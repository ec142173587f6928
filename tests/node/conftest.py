"""Fixtures of the node foundation tests: a real ``dicom-node serve`` subprocess and data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers import FIXTURES, dcmtk, free_port, port_open, wait_until

CT_DIR = FIXTURES / "mridir_small" / "ct"
MR_DIR = FIXTURES / "mridir_small" / "mr"
NODE_AET = "TESTNODE"


def node_command(*args: str) -> list[str]:
    """The ``dicom-node`` command line run with this interpreter."""
    return [sys.executable, "-m", "dicom_node.cli", *args]


def base_config(port: int, storage: Path, **sections: Any) -> dict[str, Any]:
    """A minimal node config dict on 127.0.0.1:port (sections merged on top)."""
    cfg: dict[str, Any] = {
        "node": {
            "ae_title": NODE_AET,
            "host": "127.0.0.1",
            "port": port,
            "shutdown_timeout_seconds": 30,
        },
        "storage": {"root": str(storage), "min_free_mb": 1},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **value}
        else:
            cfg[name] = value
    return cfg


@dataclass
class Node:
    """A running ``dicom-node serve`` subprocess with its temp config, storage and log."""

    proc: subprocess.Popen[bytes]
    port: int
    config_path: Path
    storage: Path
    log_path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def db_url(self) -> str:
        """SQLAlchemy URL of the node's index."""
        return f"sqlite:///{self.storage / 'index.sqlite3'}"

    def log(self) -> str:
        """Everything the node logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def write_config(self, cfg: dict[str, Any] | str) -> None:
        """Replace the config file (atomically, as an editor would on save)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg), encoding="utf-8")
        os.replace(tmp, self.config_path)
        if not isinstance(cfg, str):
            self.config = cfg

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the node and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def echoscu(self, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
        """Run DCMTK echoscu against the node."""
        return subprocess.run(
            [dcmtk("echoscu"), "-aet", calling, "-aec", NODE_AET, "127.0.0.1", str(self.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def storescu(
        self, *files: Path | str, calling: str = "MODALITY", extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run DCMTK storescu (verbose) sending ``files`` to the node."""
        return subprocess.run(
            [
                dcmtk("storescu"),
                "-v",
                *extra,
                "-aet",
                calling,
                "-aec",
                NODE_AET,
                "127.0.0.1",
                str(self.port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


def start_node(tmp: Path, cfg: dict[str, Any] | None = None, port: int | None = None) -> Node:
    """Start ``dicom-node serve`` with a config in ``tmp`` and wait until it listens."""
    port = port or free_port()
    storage = tmp / "storage"
    cfg = cfg if cfg is not None else base_config(port, storage)
    config_path = tmp / "node.yaml"
    config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    log_path = tmp / "node.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            node_command("serve", "--config", str(config_path)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    node = Node(proc, port, config_path, storage, log_path, cfg)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{node.log()}")
        return port_open(port)

    try:
        wait_until(ready, timeout=30, what="dicom-node serve to listen")
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return node


@pytest.fixture
def node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Node]]:
    """Start nodes: ``make(**sections)`` merges sections into the base config."""
    nodes: list[Node] = []

    def make(**sections: Any) -> Node:
        tmp = tmp_path_factory.mktemp("node")
        port = free_port()
        node = start_node(tmp, base_config(port, tmp / "storage", **sections), port)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node (any caller allowed) shared by a test module; must exit 0 on SIGTERM."""
    tmp = tmp_path_factory.mktemp("shared-node")
    node = start_node(tmp)
    yield node
    rc = node.stop()
    assert rc == 0, node.log()


@pytest.fixture(scope="session")
def ct_files() -> list[Path]:
    """The committed small CT fixture series."""
    files = sorted(CT_DIR.glob("*.dcm"))
    if not files:
        pytest.skip(f"fixture series missing: {CT_DIR} (tests/fixtures/make_fixtures.py)")
    return files


@pytest.fixture(scope="session")
def mr_files() -> list[Path]:
    """The committed small MR fixture series."""
    files = sorted(MR_DIR.glob("*.dcm"))
    if not files:
        pytest.skip(f"fixture series missing: {MR_DIR} (tests/fixtures/make_fixtures.py)")
    return files
