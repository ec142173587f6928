"""What every ``dicom-node`` command shares: the config it runs on, a console, the index."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Destination, NodeConfig, load_config
from dicom_node.errors import UsageError

_ADHOC_DEST = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")

PLAIN_WIDTH = 240
"""Table width when the output is not a terminal (logs, pipes): wide enough not to wrap UIDs."""


def console(stream: TextIO | None = None) -> Console:
    """A rich console on ``stream`` (stdout), plain and wide when it is not a terminal."""
    out = stream or sys.stdout
    return Console(file=out, width=None if out.isatty() else PLAIN_WIDTH, highlight=False)


def load(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> tuple[NodeConfig, Path]:
    """The config the command runs on (``--config``, else the environment, else the default)."""
    return load_config(args.config, overrides)


def destination(cfg: NodeConfig, name: str) -> Destination:
    """A configured destination by name, or an ad hoc ``AET@host:port``."""
    if name in cfg.destinations:
        return cfg.destinations[name]
    m = _ADHOC_DEST.match(name)
    if m:
        return Destination(ae_title=m["aet"], host=m["host"], port=int(m["port"]))
    known = ", ".join(sorted(cfg.destinations)) or "none configured"
    raise UsageError(f"unknown destination {name!r} (known: {known}; or give AET@host:port)")


@contextmanager
def index_sessions(config: NodeConfig) -> Iterator[sessionmaker[Session]]:
    """Sessions on the node's index (migrated to this software's schema first)."""
    from dicom_node.db import make_engine, migrate, session_factory

    engine = make_engine(config.database_url)
    try:
        migrate(engine)
        yield session_factory(engine)
    finally:
        engine.dispose()
