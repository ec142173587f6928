"""Admin actions shared by pages and API: each change recorded once, with who and what."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.console import actions
from dicom_node.console.guard import Caller
from dicom_node.states import JobState
from tests.peers import free_port
from tests.support.console import Console, make_console, make_finished_job

ADMIN = Caller("admin", "10.0.0.9")


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    c = make_console(tmp_path)
    yield c
    c.close()


def test_job_actions_recorded_when_they_change_something(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.console")
    job_id = make_finished_job(console.node, state=JobState.FAILED, error="boom")
    result = actions.job_action(console.ctx, ADMIN, job_id, "retry")
    assert result.changed and result.state == JobState.QUEUED
    again = actions.job_action(console.ctx, ADMIN, job_id, "retry")
    assert not again.changed and "nothing to retry" in again.message
    lines = [r.getMessage() for r in caplog.records if "job-retried" in r.getMessage()]
    assert lines == [
        f"console: admin from 10.0.0.9: job-retried job {job_id}: job {job_id} queued again"
    ]
    with pytest.raises(KeyError):
        actions.job_action(console.ctx, ADMIN, 999, "cancel")


def test_save_config_records_the_diff(console: Console, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.console")
    data = console.ctx.config_file.read_raw()
    data["node"]["allowed_calling_aets"] = ["CT_SIM"]
    result = actions.save_config(console.ctx, ADMIN, data)
    assert result.applied
    (line,) = [r.getMessage() for r in caplog.records if "config-changed" in r.getMessage()]
    assert "node.allowed_calling_aets added: ['CT_SIM']" in line and "10.0.0.9" in line
    caplog.clear()
    actions.save_config(console.ctx, ADMIN, data)  # no change: nothing recorded
    assert not [r for r in caplog.records if "config-changed" in r.getMessage()]


def test_echo_unreachable_destination(console: Console) -> None:
    data = console.ctx.config_file.read_raw()
    data["destinations"] = {"GONE": {"ae_title": "GONE", "host": "127.0.0.1", "port": free_port()}}
    actions.save_config(console.ctx, ADMIN, data)
    result = actions.echo_destination(console.ctx, ADMIN, "GONE")
    assert not result.ok and "GONE@127.0.0.1" in result.message and result.seconds < 15
    with pytest.raises(KeyError):
        actions.echo_destination(console.ctx, ADMIN, "NONE")
