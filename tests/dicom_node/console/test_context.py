"""The console's context: the configuration in force and the defaults of a bare context."""

from __future__ import annotations

from pathlib import Path

import yaml

from dicom_node.config_watcher import ConfigWatcher
from dicom_node.console.auth import PasswordStore
from dicom_node.console.configedit import ConfigFile
from dicom_node.console.context import DEFAULT_IDLE_SECONDS, ConsoleContext
from tests.support.indexed import make_indexed_node


def test_context_follows_the_config_file_and_knows_no_worker_by_default(tmp_path: Path) -> None:
    node = make_indexed_node(tmp_path)
    path = tmp_path / "node.yaml"
    watcher = ConfigWatcher(path, node.config)
    ctx = ConsoleContext(
        config_file=ConfigFile(path, watcher, started=node.config),
        sessions=node.sessions,
        passwords=PasswordStore(node.config.password_file),
    )
    assert ctx.config is node.config
    assert ctx.worker_alive() is None  # no embedded worker: unknown, not "down"
    assert ctx.web_sessions.idle_seconds == DEFAULT_IDLE_SECONDS

    raw = yaml.safe_load(path.read_text())
    raw["node"]["ae_title"] = "OTHERAE"
    path.write_text(yaml.safe_dump(raw))
    watcher.check()
    watcher.check()  # applied once the file reads the same on two polls
    assert ctx.config.node.ae_title == "OTHERAE"
