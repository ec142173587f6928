"""Every console change goes through one function: a log line (and later the audit trail)."""

from __future__ import annotations

import logging

import pytest

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
