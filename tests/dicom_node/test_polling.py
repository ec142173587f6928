"""The polling thread shared by the config and TLS watchers."""

from __future__ import annotations

import logging
import threading

import pytest

from dicom_node.polling import PollingThread
from tests.peers import wait_until


def test_polls_repeatedly_until_stopped() -> None:
    calls: list[int] = []
    poller = PollingThread(lambda: calls.append(1), 0.01, "test-poller")
    poller.start()
    poller.start()  # a second start while running adds no second thread
    assert poller.running
    assert sum(t.name == "test-poller" for t in threading.enumerate()) == 1
    wait_until(lambda: len(calls) >= 3, timeout=10, interval=0.01, what="three polls")
    poller.stop()
    assert not poller.running
    done = len(calls)
    assert not any(t.name == "test-poller" for t in threading.enumerate())
    assert len(calls) == done  # nothing polls after stop returned


def test_a_failing_poll_is_logged_and_the_thread_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def poll() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk gone")

    poller = PollingThread(poll, 0.01, "flaky-poller")
    with caplog.at_level(logging.ERROR, logger="dicom_node.polling"):
        poller.start()
        wait_until(lambda: len(calls) >= 3, timeout=10, interval=0.01, what="polls after a failure")
        poller.stop()
    assert any("flaky-poller: poll failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_restart_after_stop() -> None:
    calls: list[int] = []
    poller = PollingThread(lambda: calls.append(1), 0.01, "restart-poller")
    poller.start()
    poller.stop()
    before = len(calls)
    poller.start()
    wait_until(lambda: len(calls) > before, timeout=10, interval=0.01, what="polls after restart")
    poller.stop()
