"""Process-wide logging set-up from the ``logging`` config section (called once by the CLI)."""

from __future__ import annotations

import logging
import sys

from dicom_node.config import LoggingSection

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(section: LoggingSection, *, verbose: bool = False) -> None:
    """Log to stderr (and ``section.file`` if set) at ``section.level`` (DEBUG if verbose).

    pynetdicom's own chatter stays at WARNING unless the level is DEBUG (its DEBUG output may
    contain patient data, which is only acceptable at DEBUG).
    """
    level = logging.DEBUG if verbose else getattr(logging, section.level)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if section.file is not None:
        section.file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(section.file, encoding="utf-8"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    pynetdicom_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)


def set_level(section: LoggingSection) -> None:
    """Apply a reloaded ``logging.level`` to the root logger."""
    logging.getLogger().setLevel(getattr(logging, section.level))
