"""Every console change goes through one function: a log line and an audit record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_node import audit
from dicom_node.config import NodeConfig
from dicom_node.console.changes import Action, Change, config_diff, record_change


def test_change_logged_with_actor_client_and_detail(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.console")
    record_change(Change("admin", "10.0.0.7", Action.JOB_RETRIED, "job 5", "job 5 queued again"))
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO
    assert rec.getMessage() == "console: admin from 10.0.0.7: job-retried job 5: job 5 queued again"


def test_failed_login_is_a_warning_with_escaped_user(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.console")
    record_change(Change("evil\nFAKE LINE" + "x" * 300, "1.2.3.4", Action.LOGIN_FAILED, "console"))
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING
    message = rec.getMessage()
    assert "\n" not in message and "evil\\nFAKE LINE" in message
    assert message.count("x") < 250 and "..." in message


def test_config_diff_names_keys() -> None:
    old = {"node": {"port": 104, "allowed_calling_aets": []}, "destinations": {"A": {"port": 1}}}
    new = {
        "node": {"port": 104, "allowed_calling_aets": ["CT"]},
        "destinations": {"B": {"port": 2}},
        "routing": {"send_to": ["B"]},
    }
    assert config_diff(old, new) == [
        "destinations.A removed (was {'port': 1})",
        "destinations.B added: {'port': 2}",
        "node.allowed_calling_aets: [] -> ['CT']",
        "routing.send_to added: ['B']",
    ]
    assert config_diff(new, new) == []


def test_console_events_reach_the_audit_trail(tmp_path: Path) -> None:
    config = NodeConfig.model_validate({"storage": {"root": str(tmp_path)}})
    record_change(Change("admin", "127.0.0.1", Action.LOGIN, "console"), config)
    record_change(Change("mallory", "10.0.0.9", Action.LOGIN_FAILED, "console"), config)
    keys = ("node.allowed_calling_aets",)
    change = Change("admin", "127.0.0.1", Action.CONFIG_CHANGED, "node.yaml", "x", keys=keys)
    record_change(change, config)
    record_change(Change("admin", "127.0.0.1", Action.JOB_CANCELLED, "job 4", "ok", 4), config)
    record_change(Change("admin", "127.0.0.1", Action.ECHO, "destination PACS", "ok"), config)
    log_file, _ = config.audit.paths(config.storage.root)
    records = audit.read_log(log_file)
    assert [r["event"] for r in records] == [
        "user-login",
        "user-login",
        "config-change",
        "job-action",
    ]
    assert [r["outcome"] for r in records[:2]] == [0, 4]
    assert records[2]["detail"]["keys"] == ["node.allowed_calling_aets"]
    assert records[2]["participants"][0]["user_id"] == "admin"
    assert records[3]["objects"][0] == {"type": "job", "id": "4"}
    assert not audit.verify_log(log_file).problems
