"""A daemon thread that calls one function at a fixed interval until it is stopped.

The config watcher and the TLS certificate watcher both poll files. One implementation keeps
what an admin relies on the same for both: ``start`` is idempotent, ``stop`` waits for the
thread, and a poll that raises is logged with its traceback and never ends the thread (a
watcher that died silently would leave a node running on a configuration or a certificate
that nobody can change any more).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

JOIN_SECONDS = 5.0
"""How long ``stop`` waits for a poll in progress to finish."""


class PollingThread:
    """Calls ``poll`` every ``interval`` seconds in a daemon thread named ``name``."""

    def __init__(self, poll: Callable[[], object], interval: float, name: str) -> None:
        self._poll = poll
        self.interval = interval
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True between ``start`` and ``stop``."""
        return self._thread is not None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._poll()
            except Exception:  # never let the thread die
                log.exception("%s: poll failed", self.name)

    def start(self) -> None:
        """Start the thread (again after ``stop``); a second call while running does nothing."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for a poll in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=JOIN_SECONDS)
            self._thread = None
