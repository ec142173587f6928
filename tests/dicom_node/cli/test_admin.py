"""``dicom-node admin set-password``: from a pipe, hashed, owner-only, where the config says."""

from __future__ import annotations

import io
import json
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.cli.admin import read_password
from dicom_node.console.auth import PasswordStore
from dicom_node.errors import EXIT_OK, EXIT_USAGE, UsageError
from tests.peers.node import node_command

PW = "piped password 123"


def _config(tmp_path: Path, **sections: object) -> Path:
    path = tmp_path / "etc" / "node.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"storage": {"root": "../data"}, **sections}))
    return path


def test_password_from_a_pipe_stored_as_hash_under_storage(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = subprocess.run(
        node_command("admin", "set-password", "--config", str(config)),
        input=PW + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_OK, result.stderr
    users = tmp_path / "data" / "console" / "users.json"
    assert str(users) in result.stdout
    assert PW not in users.read_text() and PW not in result.stdout
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert json.loads(users.read_text())["users"]["admin"]["hash"].startswith("$argon2id$")
    assert PasswordStore(users).verify("admin", PW)


def test_configured_password_file_relative_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, http={"port": 8081, "password_file": "secrets/console.json"})
    monkeypatch.setattr("sys.stdin", io.StringIO(PW + "\r\n"))
    assert main(["admin", "set-password", "--config", str(config)]) == EXIT_OK
    assert PasswordStore(config.parent / "secrets" / "console.json").verify("admin", PW)


def test_short_or_missing_password_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["admin", "set-password", "--config", str(config)]) == EXIT_USAGE
    assert "at least" in capsys.readouterr().err
    assert not (tmp_path / "data" / "console").exists()
    with pytest.raises(UsageError, match="no password"):
        read_password(io.StringIO(""))
