"""Live reload: valid edits apply; invalid ones, and ones that would open the node by accident,
keep the last good config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig, load_config, load_config_snapshot
from dicom_node.config_watcher import ConfigWatcher, restart_needed
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
        with caplog.at_level(logging.ERROR, logger="dicom_node.config_watcher"):
            write(
                cfg_file, {"node": {"allowed_calling_aets": ["A", "B", "C"], "max_associations": 0}}
            )
            wait_until(lambda: "reload rejected" in caplog.text, timeout=5, what="rejection")
        assert "node.max_associations" in caplog.text
        assert watcher.current.node.allowed_calling_aets == ["A", "B"]
        assert len(seen) == 1
        os.remove(cfg_file)
        write(cfg_file, {"node": {"allowed_calling_aets": ["A"]}})
        wait_until(lambda: len(seen) == 2, timeout=5, what="second reload")
        assert watcher.current.node.allowed_calling_aets == ["A"]
    finally:
        watcher.stop()


def settle(watcher: ConfigWatcher) -> bool:
    """Two polls: a change is applied once it read the same twice."""
    first = watcher.check()
    return watcher.check() or first


LISTED = {"node": {"allowed_calling_aets": ["A", "B"], "port": 5000}}


@pytest.fixture
def listed(tmp_path: Path) -> tuple[Path, ConfigWatcher, list[NodeConfig]]:
    cfg_file = write(tmp_path / "n.yaml", LISTED)
    cfg, path = load_config(cfg_file)
    watcher = ConfigWatcher(path, cfg)
    seen: list[NodeConfig] = []
    watcher.subscribe(seen.append)
    return cfg_file, watcher, seen


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "node: section missing"),
        ("# every line commented out\n", "node: section missing"),
        ({"storage": {"min_free_mb": 1}}, "node: section missing"),
        ({"node": {"port": 5000}}, "would let any calling AE store"),
        ({"node": {"allowed_calling_aets": [], "port": 5000}}, "would let any calling AE store"),
    ],
    ids=["empty", "comments", "no-node", "key-missing", "list-emptied"],
)
def test_reload_never_opens_the_node_by_accident(
    listed: tuple[Path, ConfigWatcher, list[NodeConfig]],
    caplog: pytest.LogCaptureFixture,
    content: object,
    why: str,
) -> None:
    cfg_file, watcher, seen = listed
    write(cfg_file, content)
    with caplog.at_level(logging.ERROR, logger="dicom_node.config_watcher"):
        assert settle(watcher) is False
    assert "config reload rejected" in caplog.text and why in caplog.text
    assert watcher.current.node.calling_aets == ("A", "B")
    assert seen == []


def test_deleted_file_keeps_last_good(
    listed: tuple[Path, ConfigWatcher, list[NodeConfig]], caplog: pytest.LogCaptureFixture
) -> None:
    cfg_file, watcher, seen = listed
    os.remove(cfg_file)
    with caplog.at_level(logging.ERROR, logger="dicom_node.config_watcher"):
        assert settle(watcher) is False
    assert "disappeared" in caplog.text
    assert watcher.current.node.calling_aets == ("A", "B") and seen == []
    write(cfg_file, {"node": {"allowed_calling_aets": ["A"]}})  # back: applies again
    assert settle(watcher) is True
    assert list(watcher.current.node.calling_aets) == ["A"]


def test_any_written_explicitly_opens(listed: tuple[Path, ConfigWatcher, list[NodeConfig]]) -> None:
    cfg_file, watcher, seen = listed
    write(cfg_file, {"node": {"allowed_calling_aets": "ANY", "port": 5000}})
    assert settle(watcher) is True
    assert seen[-1].node.accepts_any_caller
    # once open, a file that leaves the key out keeps it open (nothing is widened)
    write(cfg_file, {"node": {"port": 5000, "max_associations": 3}})
    assert settle(watcher) is True
    assert seen[-1].node.max_associations == 3


def test_edit_saved_while_starting_is_applied(tmp_path: Path) -> None:
    """The watcher starts from the content the config was parsed from, not the file as it is
    when the watcher is made (serve spends seconds in between)."""
    cfg_file = write(tmp_path / "n.yaml", LISTED)
    snapshot, path = load_config_snapshot(cfg_file)
    write(cfg_file, {"node": {"allowed_calling_aets": ["A", "B", "NEW"], "port": 5000}})
    watcher = ConfigWatcher(path, snapshot.config, signature=snapshot.signature)
    assert settle(watcher) is True
    assert watcher.current.node.calling_aets == ("A", "B", "NEW")
    late = ConfigWatcher(path, snapshot.config)  # without the signature the edit is lost
    assert settle(late) is False


def test_restart_warnings_compare_with_the_running_config(
    listed: tuple[Path, ConfigWatcher, list[NodeConfig]], caplog: pytest.LogCaptureFixture
) -> None:
    cfg_file, watcher, _ = listed
    with caplog.at_level(logging.INFO, logger="dicom_node.config_watcher"):
        write(cfg_file, {"node": {"allowed_calling_aets": ["A", "B"], "port": 5001}})
        assert settle(watcher)
        assert "config node.port changed" in caplog.text
        caplog.clear()
        write(cfg_file, {"node": {"allowed_calling_aets": ["A", "B", "C"], "port": 5001}})
        assert settle(watcher)
        assert "takes effect after a restart" not in caplog.text  # already told
        caplog.clear()
        write(cfg_file, LISTED)  # restored: matches what runs, no false warning
        assert settle(watcher)
    assert "takes effect after a restart" not in caplog.text
    assert "node.port is back to the value this process runs with" in caplog.text


def test_restart_needed_keys() -> None:
    a = NodeConfig()
    b = NodeConfig.model_validate(
        {"node": {"port": 1234, "association_request_timeout_seconds": 3}}
    )
    assert restart_needed(a, b) == ["node.port", "node.association_request_timeout_seconds"]
    assert restart_needed(a, a) == []
