"""``dicom-node healthcheck``: the container health check of serve and of workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.errors import EXIT_IO, EXIT_NETWORK, EXIT_OK
from tests.peers import free_port
from tests.peers.node import NodeProcess
from tests.support.indexed import IndexedNode


def test_serve_check_echoes_the_running_node(
    node_factory: Callable[..., NodeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    node = node_factory(worker={"embedded": False})
    assert main(["healthcheck", "--config", str(node.config_path)]) == EXIT_OK
    assert f"C-ECHO FUSIONNODE@127.0.0.1:{node.port} ok" in capsys.readouterr().out
    assert "no embedded worker" in node.log()
    assert node.stop() == 0
    assert main(["healthcheck", "--config", str(node.config_path), "--timeout", "2"]) == (
        EXIT_NETWORK
    )


def test_worker_check_needs_the_database_and_the_shared_storage(
    indexed_node: IndexedNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"  # indexed_node's config file
    assert main(["healthcheck", "--role", "worker", "--config", str(config)]) == EXIT_OK
    assert "database and storage" in capsys.readouterr().out
    unmounted = yaml.safe_load(config.read_text())
    unmounted["storage"]["root"] = str(tmp_path / "empty-mount-point")
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(yaml.safe_dump(unmounted))
    assert main(["healthcheck", "--role", "worker", "--config", str(elsewhere)]) == EXIT_IO
    assert "not the node's storage" in capsys.readouterr().err
    no_database = yaml.safe_load(config.read_text())
    no_database["database"]["url"] = f"postgresql+psycopg://node@127.0.0.1:{free_port()}/index"
    elsewhere.write_text(yaml.safe_dump(no_database))
    assert main(["healthcheck", "--role", "worker", "--config", str(elsewhere)]) == EXIT_IO
    assert "does not answer" in capsys.readouterr().err
