"""Live reload: valid edits apply, invalid ones keep the last good config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig, load_config
from dicom_node.config_watcher import ConfigWatcher
from tests.peers import wait_until
from tests.support.config_files import write


def test_watcher_applies_valid_and_keeps_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg_file = write(tmp_path / "n.yaml", {"node": {"allowed_calling_aets": ["A"], "port": 5000}})
    cfg, path = load_config(cfg_file, {"node.port": 6000})
    watcher = ConfigWatcher(path, cfg, overrides={"node.port": 6000}, interval=0.05)
    seen: list[NodeConfig] = []
    watcher.subscribe(seen.append)
    assert watcher.check() is False  # unchanged file
    watcher.start()
    try:
        write(cfg_file, {"node": {"allowed_calling_aets": ["A", "B"], "port": 5000}})
        wait_until(lambda: seen, timeout=5, what="reload")
        assert seen[-1].node.allowed_calling_aets == ["A", "B"]
        assert seen[-1].node.port == 6000  # the override survives the reload
        with caplog.at_level(logging.ERROR, logger="dicom_node.config"):
            write(
                cfg_file, {"node": {"allowed_calling_aets": ["A", "B", "C"], "max_associations": 0}}
            )
            wait_until(lambda: "reload rejected" in caplog.text, timeout=5, what="rejection")
        assert "node.max_associations" in caplog.text
        assert watcher.current.node.allowed_calling_aets == ["A", "B"]
        assert len(seen) == 1
        os.remove(cfg_file)
        write(cfg_file, {"node": {"allowed_calling_aets": []}})
        wait_until(lambda: len(seen) == 2, timeout=5, what="second reload")
        assert watcher.current.node.allowed_calling_aets == []
    finally:
        watcher.stop()
