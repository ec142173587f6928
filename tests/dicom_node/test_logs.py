"""Log lines: one record is one line whatever a peer sends; the log file is owner-only."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from dicom_node.config import LoggingSection
from dicom_node.logs import TRACEBACK_INDENT, EscapingFormatter, escape, setup_logging


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad UID 1.2\n2099-01-01 ERROR forged")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("pynetdicom.acse", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_escape() -> None:
    assert escape("1.2.3\n2024 INFO x") == "1.2.3\\n2024 INFO x"
    assert escape("a\r\x1b[31mred\x00") == "a\\r\\x1b[31mred\\x00"
    assert escape("ok \u2028 line sep") == "ok \\u2028 line sep"
    assert escape("Müller^Jörg") == "Müller^Jörg"  # printable non-ASCII stays readable


def test_wire_data_cannot_forge_lines() -> None:
    fmt = EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    line = fmt.format(record("association from AE %r uid %s", "EVIL\nAE", "1.2\r\nINFO fake"))
    assert "\n" not in line and "\r" not in line
    assert line.startswith("WARNING pynetdicom.acse: association from AE 'EVIL\\nAE'")
    text = fmt.format(record("failed", exc=True))
    first, *rest = text.split("\n")
    assert first == "WARNING pynetdicom.acse: failed"
    assert rest and all(r.startswith(TRACEBACK_INDENT) for r in rest)
    assert any("forged" in r and "\\n" in r for r in rest)


def test_log_file_owner_only(tmp_path: Path) -> None:
    log_file = tmp_path / "new-folder" / "node.log"
    old_umask = os.umask(0o022)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging(LoggingSection(level="INFO", file=log_file))
        logging.getLogger("dicom_node.test").info("hello")
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700
        assert "hello" in log_file.read_text()
        log_file.chmod(0o644)  # made readable by an earlier release
        setup_logging(LoggingSection(level="INFO", file=log_file))
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
        for h in root.handlers:
            if h not in saved[0]:
                h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize("level", ["WARNING", "DEBUG"])
def test_pynetdicom_level_follows(tmp_path: Path, level: str) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging(LoggingSection(level=level))  # type: ignore[arg-type]
        expected = logging.DEBUG if level == "DEBUG" else logging.WARNING
        assert logging.getLogger("pynetdicom").level == expected
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
