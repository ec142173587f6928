"""Live reload of the config file: poll, validate, hand a new config to the running parts.

:class:`ConfigWatcher` is the only code that re-reads the file while the node runs (through
:func:`dicom_node.config.read_config_file`, so a reload is validated exactly like a start).
A change applies only once the same new content has been seen on two consecutive polls, an
invalid edit keeps the last good config, and every reload, applied or rejected, is reported to
change listeners (the audit trail).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dicom_node.config import NodeConfig, read_config_file
from dicom_node.errors import ConfigError

log = logging.getLogger(__name__)


def restart_needed(old: NodeConfig, new: NodeConfig) -> list[str]:
    """Keys that changed between two configs but take effect only after a restart."""
    keys = []
    for section, field in (
        ("node", "host"),
        ("node", "port"),
        ("node", "network_timeout_seconds"),
        ("storage", "root"),
        ("database", "url"),
        ("logging", "file"),
        ("worker", "embedded"),
    ):
        if getattr(getattr(old, section), field) != getattr(getattr(new, section), field):
            keys.append(f"{section}.{field}")
    old_tls, new_tls = old.node.tls, new.node.tls
    if (old_tls and old_tls.port) != (new_tls and new_tls.port):
        keys.append("node.tls.port")  # opening or closing the TLS listener too
    if old.http != new.http:
        keys.append("http")
    return keys


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (or their JSON dumps)."""
    if isinstance(old, BaseModel) and isinstance(new, BaseModel):
        return changed_keys(old.model_dump(mode="json"), new.model_dump(mode="json"), prefix)
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(top level)"]
    keys: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        keys.extend(changed_keys(old.get(key), new.get(key), f"{prefix}{key}."))
    return [k.rstrip(".") for k in keys]


@dataclass(frozen=True)
class ConfigChange:
    """One reload of the config file, applied or rejected (what the audit trail records)."""

    path: Path
    applied: bool
    keys: list[str] = dataclasses.field(default_factory=list)
    """Dotted keys that changed (applied changes only)."""
    error: str | None = None
    """Why the new content was rejected."""
    sha256: str | None = None
    """Digest of the file content that was applied or rejected."""


Subscriber = Callable[[NodeConfig], None]
ChangeListener = Callable[[ConfigChange], None]


class ConfigWatcher:
    """Poll a config file and hand each valid new version to subscribers.

    The file is checked every ``interval`` seconds (at most 1 s by default) by a daemon
    thread; :meth:`check` does one poll and can be called from a scheduler instead. A change
    is applied only once the same new content has been seen on two consecutive polls, so a file
    caught half-written by an editor (empty, say, which would mean "all defaults" and an open
    allow-list) is never applied. An invalid edit is logged as an error and the last good config
    stays in force.
    """

    def __init__(
        self,
        path: Path,
        initial: NodeConfig,
        *,
        overrides: Mapping[str, Any] | None = None,
        interval: float = 1.0,
    ) -> None:
        """Watch ``path``, starting from the already loaded ``initial`` config."""
        self.path = path
        self.interval = interval
        self._overrides = dict(overrides or {})
        self._current = initial
        self._signature = self._file_signature()
        self._pending: str | None = None
        self._subscribers: list[Subscriber] = []
        self._listeners: list[ChangeListener] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> NodeConfig:
        """The last good config."""
        return self._current

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(new_config)`` after every successful reload."""
        self._subscribers.append(callback)

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener(change)`` for every reload, applied or rejected (audit trail)."""
        self._listeners.append(listener)

    def _tell(self, change: ConfigChange) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("config change listener %r failed", listener)

    def _file_signature(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self) -> bool:
        """Poll once; reload and notify when the file changed. True when a new config applied."""
        with self._lock:
            sig = self._file_signature()
            if sig == self._signature:
                self._pending = None
                return False
            if sig != self._pending:  # first sight of this content: let the write settle
                self._pending = sig
                return False
            self._pending = None
            self._signature = sig
            if sig is None:
                log.error("config file %s disappeared; keeping the last good config", self.path)
                self._tell(ConfigChange(self.path, applied=False, error="file disappeared"))
                return False
            try:
                new = read_config_file(self.path, self._overrides)
            except ConfigError as exc:
                log.error("config reload rejected, keeping the last good config:\n%s", exc)
                self._tell(ConfigChange(self.path, applied=False, error=str(exc), sha256=sig))
                return False
            old, self._current = self._current, new
            self._tell(ConfigChange(self.path, True, changed_keys(old, new), sha256=sig))
            for key in restart_needed(old, new):
                log.warning("config %s changed in %s: takes effect after a restart", key, self.path)
            log.info("config reloaded from %s", self.path)
            for callback in self._subscribers:
                try:
                    callback(new)
                except Exception:
                    log.exception("config reload subscriber %r failed", callback)
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let the watcher thread die
                log.exception("config watcher poll failed")

    def start(self) -> None:
        """Start the polling thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the polling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
