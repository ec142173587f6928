"""Process-wide logging set-up from the ``logging`` config section (called once by the CLI).

Every line is written by :class:`EscapingFormatter`: control characters (a newline in a UID or
an AE title sent by a peer, say) are escaped in every message, pynetdicom's and pydicom's
included, so one record is one line and no peer can forge log lines. Exception tracebacks keep
their lines, each indented, so they cannot pass for a record either; exceptions that end a
library's thread and Python warnings are routed through logging for the same reason. The log
file is created owner-only (it names AE titles, addresses and, at DEBUG, patients).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

from dicom_node.config import LoggingSection
from dicom_node.storage.fsutil import DIR_MODE, FILE_MODE, restrict_mode

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
TRACEBACK_INDENT = "    | "


def escape(text: str) -> str:
    """``text`` with every control character written as a Python escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFormatter(logging.Formatter):
    """A formatter whose every record is one line (see module docstring)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API
        """The record's line with the message's control characters escaped."""
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:  # noqa: N802 - logging API
        """A traceback, each line escaped and indented under the record."""
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join(TRACEBACK_INDENT + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging API
        """A stack, each line escaped and indented under the record."""
        return "\n".join(TRACEBACK_INDENT + escape(line) for line in stack_info.splitlines())


def _private_log_file(path: Path) -> logging.Handler:
    """A handler on ``path``, the file (and a folder the node makes for it) owner-only."""
    if not path.parent.exists():
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    os.close(fd)
    restrict_mode(path, FILE_MODE)
    return logging.FileHandler(path, encoding="utf-8")


def setup_logging(section: LoggingSection, *, verbose: bool = False) -> None:
    """Log to stderr (and ``section.file`` if set) at ``section.level`` (DEBUG if verbose).

    pynetdicom's own chatter stays at WARNING unless the level is DEBUG (its DEBUG output may
    contain patient data, which is only acceptable at DEBUG).
    """
    level = logging.DEBUG if verbose else getattr(logging, section.level)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if section.file is not None:
        handlers.append(_private_log_file(section.file))
    formatter = EscapingFormatter(FORMAT)
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=handlers, force=True)
    logging.captureWarnings(True)  # library warnings go through the same formatter
    threading.excepthook = _log_thread_exception
    pynetdicom_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ended a thread (a library's): one escaped record, not raw stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    logging.getLogger("dicom_node.threads").error(
        "uncaught exception ended thread %s",
        name,
        exc_info=(args.exc_type, exc, args.exc_traceback),
    )


def set_level(section: LoggingSection) -> None:
    """Apply a reloaded ``logging.level`` to the root logger."""
    logging.getLogger().setLevel(getattr(logging, section.level))
