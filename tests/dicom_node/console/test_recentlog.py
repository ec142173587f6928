"""The dashboard's recent warnings: kept newest first, INFO ignored, bounded."""

from __future__ import annotations

import logging

from dicom_node.console.recentlog import MAX_MESSAGE_CHARS, RecentLog


def test_keeps_warnings_newest_first_and_bounded() -> None:
    logger = logging.getLogger("test.recentlog")
    logger.propagate = False
    handler = RecentLog(capacity=3)
    handler.install(logger)
    try:
        logger.setLevel(logging.INFO)
        logger.info("routine")
        for i in range(4):
            logger.warning("problem %d", i)
        try:
            raise ValueError("x")
        except ValueError:
            logger.exception("failed " + "y" * 1000)
    finally:
        handler.uninstall(logger)
    lines = handler.lines()
    assert len(lines) == 3
    assert lines[0].level == "ERROR" and lines[0].message.endswith("y") is True
    assert len(lines[0].message) == MAX_MESSAGE_CHARS
    assert [line.message for line in lines[1:]] == ["problem 3", "problem 2"]
    assert all(line.logger == "test.recentlog" for line in lines)
