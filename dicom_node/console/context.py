"""What the console works on, handed to every route: the config file, the index, the worker.

A module of its own, below the routes and the guards that all need it, so that none of them
imports the application module that assembles them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.console.auth import BasicCache, LoginLimiter, PasswordStore, SessionStore
from dicom_node.console.configedit import ConfigFile
from dicom_node.console.recentlog import RecentLog

DEFAULT_IDLE_SECONDS = 30 * 60.0
"""A console session ends after this long without a request."""

ECHO_TIMEOUT_SECONDS = 10.0
"""How long the console's C-ECHO of a destination may take."""


def _no_worker() -> bool | None:
    """No embedded worker in this process: its liveness is not known here."""
    return None


@dataclass
class ConsoleContext:
    """What the console works on: the config file, the index, the worker, its own state."""

    config_file: ConfigFile
    sessions: sessionmaker[Session]
    passwords: PasswordStore
    worker_alive: Callable[[], bool | None] = _no_worker
    web_sessions: SessionStore = field(default_factory=lambda: SessionStore(DEFAULT_IDLE_SECONDS))
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    basic_cache: BasicCache = field(default_factory=BasicCache)
    recent: RecentLog = field(default_factory=RecentLog)
    echo_timeout: float = ECHO_TIMEOUT_SECONDS

    @property
    def config(self) -> NodeConfig:
        """The configuration in force."""
        return self.config_file.current
