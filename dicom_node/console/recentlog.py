"""The last warnings and errors the ``serve`` process logged, for the dashboard.

The node logs no patient names or IDs at WARNING or above, so these lines may be shown to an
admin; they are shortened and escaped by the page like any other text.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

MAX_RECORDS = 50
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class LogLine:
    """One logged warning or error."""

    at: datetime
    level: str
    logger: str
    message: str


class RecentLog(logging.Handler):
    """A logging handler keeping the last :data:`MAX_RECORDS` records at WARNING or above."""

    def __init__(self, capacity: int = MAX_RECORDS) -> None:
        """Keep at most ``capacity`` records."""
        super().__init__(level=logging.WARNING)
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        """Keep one record (never raises: logging must not fail the node)."""
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f" ({type(record.exc_info[1]).__name__})"
            line = LogLine(
                at=datetime.fromtimestamp(record.created, UTC),
                level=record.levelname,
                logger=record.name,
                message=message[:MAX_MESSAGE_CHARS],
            )
            with self._guard:
                self._lines.append(line)
        except Exception:  # pragma: no cover - logging.Handler's own contract
            self.handleError(record)

    def lines(self) -> list[LogLine]:
        """The kept records, newest first."""
        with self._guard:
            return list(reversed(self._lines))

    def install(self, logger: logging.Logger | None = None) -> None:
        """Listen on ``logger`` (the root logger by default)."""
        (logger or logging.getLogger()).addHandler(self)

    def uninstall(self, logger: logging.Logger | None = None) -> None:
        """Stop listening."""
        (logger or logging.getLogger()).removeHandler(self)
