"""Config edits: validated by the model, comments kept, written atomically, applied at once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from dicom_node.config import read_config_file
from dicom_node.config_watcher import ConfigWatcher
from dicom_node.console.configedit import (
    ABSENT,
    TOP_LEVEL,
    ConfigConflictError,
    ConfigFile,
    ConfigInvalidError,
    render,
    validate,
)
from tests.peers import REPO

SHIPPED = REPO / "config" / "node.yaml"


def _shipped_copy(tmp_path: Path) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(SHIPPED.read_text())
    return path


def test_render_keeps_every_comment_of_the_shipped_file() -> None:
    text = SHIPPED.read_text()
    data = yaml.safe_load(text)
    data["node"]["allowed_calling_aets"] = ["CT_SIM", "MR_3T"]
    data["destinations"] = {"TPS": {"ae_title": "ECLIPSE", "host": "10.1.2.3", "port": 104}}
    data["routing"]["send_to"] = ["TPS"]
    out = render(text, data)
    assert yaml.safe_load(out) == data
    comments = [line.strip() for line in text.splitlines() if line.strip().startswith("#")]
    kept = [line.strip() for line in out.splitlines() if line.strip().startswith("#")]
    assert kept == comments
    assert "allowed_calling_aets: [CT_SIM, MR_3T]" in out
    assert "url: null" in out  # nulls stay spelt as in the file
    assert 'uid_root: "2.25"' in out  # untouched values keep their quoting


def test_render_of_unchanged_data_is_the_same_text() -> None:
    text = SHIPPED.read_text()
    assert render(text, yaml.safe_load(text)) == text


def test_render_without_a_file_or_of_a_broken_one() -> None:
    data = {"node": {"port": 104}, "destinations": {}}
    for current in (None, "", "node: [unclosed\n"):
        assert yaml.safe_load(render(current, data)) == data


def test_validate_names_keys() -> None:
    with pytest.raises(ConfigInvalidError) as exc:
        validate({"node": {"port": 0, "colour": "red"}, "routing": {"send_to": ["X"]}})
    keys = {e.key: e.message for e in exc.value.errors}
    assert keys["node.colour"] == "unknown key (misspelt, or not supported here)"
    assert "greater than or equal to 1" in keys["node.port"]
    with pytest.raises(ConfigInvalidError) as exc:
        validate({"routing": {"send_to": ["X"]}})
    assert [e.key for e in exc.value.errors] == ["routing.send_to"]
    with pytest.raises(ConfigInvalidError) as exc:
        validate(["not", "a", "mapping"])
    assert exc.value.errors[0].key == TOP_LEVEL


def _watched(path: Path) -> tuple[ConfigFile, ConfigWatcher]:
    cfg = read_config_file(path)
    watcher = ConfigWatcher(path, cfg)
    return ConfigFile(path, watcher, started=cfg), watcher


def test_save_applies_at_once_and_reports_restart_keys(tmp_path: Path) -> None:
    path = _shipped_copy(tmp_path)
    cfile, watcher = _watched(path)
    data = cfile.read_raw()
    data["node"]["allowed_calling_aets"] = ["NEWCT"]
    data["node"]["port"] = 11113
    result = cfile.save(data, expected_version=cfile.version())
    assert result.changed and result.applied
    assert watcher.current.node.allowed_calling_aets == ["NEWCT"]
    assert result.restart_keys == ["node.port"]
    assert "node.allowed_calling_aets: [] -> ['NEWCT']" in result.diff
    assert result.version == cfile.version()


def test_invalid_or_stale_save_writes_nothing(tmp_path: Path) -> None:
    path = _shipped_copy(tmp_path)
    cfile, watcher = _watched(path)
    before = path.read_bytes()
    data = cfile.read_raw()
    data["destinations"] = {"X": {"ae_title": "X", "host": "h", "port": 70000}}
    with pytest.raises(ConfigInvalidError):
        cfile.save(data)
    data["destinations"]["X"]["port"] = 104
    with pytest.raises(ConfigConflictError):
        cfile.save(data, expected_version="0" * 32)
    assert path.read_bytes() == before
    assert watcher.current.destinations == {}


def test_save_keeps_mode_and_writes_through_a_symlink(tmp_path: Path) -> None:
    real = _shipped_copy(tmp_path)
    os.chmod(real, 0o600)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    cfile, watcher = _watched(link)
    data = cfile.read_raw()
    data["node"]["ae_title"] = "RENAMED"
    assert cfile.save(data).applied
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert yaml.safe_load(real.read_text())["node"]["ae_title"] == "RENAMED"
    assert watcher.current.node.ae_title == "RENAMED"


def test_save_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    cfile = ConfigFile(path)
    assert cfile.version() == ABSENT and cfile.read_raw() == {}
    result = cfile.save({"node": {"allowed_calling_aets": ["A"]}})
    assert result.changed and not result.applied  # nothing runs on it
    assert read_config_file(path).node.allowed_calling_aets == ["A"]
