"""Live reload of the config file: poll, validate, hand a new config to the running parts.

:class:`ConfigWatcher` is the only code that re-reads the file while the node runs (through
:func:`dicom_node.config.parse_config_bytes`, so a reload is validated exactly like a start).
A change applies only once the same new content has been seen on two consecutive polls, an
invalid edit keeps the last good config, and every reload, applied or rejected, is reported to
change listeners (the audit trail).

A reload must never open the node by accident, so besides being valid a new version must

- have a ``node`` section (an empty or cut-off file, or one saved without it, is refused);
- say ``allowed_calling_aets: ANY`` explicitly when it would let any calling AE store while the
  running config does not (a list emptied or deleted by mistake is refused);

otherwise the last good config stays in force and an ERROR says why. A deleted file keeps the
last good config the same way. Keys that only take effect after a restart
(:func:`restart_needed`) are compared with the config the process *started* with, so
restoring a file logs no false "restart" warning.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dicom_node.config import (
    ANY_CALLER,
    ConfigSnapshot,
    NodeConfig,
    file_signature,
    parse_config_bytes,
)
from dicom_node.errors import ConfigError
from dicom_node.polling import PollingThread

log = logging.getLogger(__name__)


def restart_needed(old: NodeConfig, new: NodeConfig) -> list[str]:
    """Keys that changed between two configs but take effect only after a restart."""
    keys = []
    for section, field in (
        ("node", "host"),
        ("node", "port"),
        ("node", "network_timeout_seconds"),
        ("node", "association_request_timeout_seconds"),
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


def check_reload_is_safe(path: Path, snapshot: ConfigSnapshot, current: NodeConfig) -> None:
    """Raise :class:`ConfigError` when applying ``snapshot`` could open the node by accident."""
    raw = snapshot.raw
    node = raw.get("node") if isinstance(raw, dict) else None
    if not isinstance(node, dict):
        raise ConfigError(
            f"{path}: node: section missing (an empty or cut-off file?); a reload needs the "
            "node section with allowed_calling_aets"
        )
    opens = snapshot.config.node.accepts_any_caller and not current.node.accepts_any_caller
    if opens and str(node.get("allowed_calling_aets")).strip().upper() != ANY_CALLER:
        raise ConfigError(
            f"{path}: node.allowed_calling_aets: missing or empty, which would let any calling "
            f"AE store; list the AE titles, or write `allowed_calling_aets: {ANY_CALLER}` to "
            "allow any caller on purpose"
        )


_UNSET: Any = object()


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
    caught half-written by an editor is never applied. An invalid edit, or one that would open
    the node by accident (see the module docstring), is logged as an error and the last good
    config stays in force. ``signature`` is the :func:`~dicom_node.config.file_signature` of the
    content ``initial`` was parsed from (:func:`~dicom_node.config.load_config_snapshot`): an
    edit saved after that, while the process was still starting, is then applied by the first
    polls. Without it the file as it is now counts as applied.
    """

    def __init__(
        self,
        path: Path,
        initial: NodeConfig,
        *,
        overrides: Mapping[str, Any] | None = None,
        interval: float = 1.0,
        signature: str | None = _UNSET,
    ) -> None:
        """Watch ``path``, starting from the already loaded ``initial`` config."""
        self.path = path
        self.interval = interval
        self._overrides = dict(overrides or {})
        self._running = initial
        self._current = initial
        self._signature = self._read()[1] if signature is _UNSET else signature
        self._pending: str | None = None
        self._subscribers: list[Subscriber] = []
        self._listeners: list[ChangeListener] = []
        self._lock = threading.Lock()
        self._poller = PollingThread(self.check, interval, "config-watcher")

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

    def _read(self) -> tuple[bytes | None, str | None]:
        try:
            data = self.path.read_bytes()
        except OSError:
            return None, None
        return data, file_signature(data)

    def check(self) -> bool:
        """Poll once; reload and notify when the file changed. True when a new config applied."""
        with self._lock:
            data, sig = self._read()
            if sig == self._signature:
                self._pending = None
                return False
            if sig != self._pending:  # first sight of this content: let the write settle
                self._pending = sig
                return False
            self._pending = None
            self._signature = sig
            if data is None:
                log.error("config file %s disappeared; keeping the last good config", self.path)
                self._tell(ConfigChange(self.path, applied=False, error="file disappeared"))
                return False
            try:
                snapshot = parse_config_bytes(self.path, data, self._overrides)
                check_reload_is_safe(self.path, snapshot, self._current)
            except ConfigError as exc:
                log.error("config reload rejected, keeping the last good config:\n%s", exc)
                self._tell(ConfigChange(self.path, applied=False, error=str(exc), sha256=sig))
                return False
            self._apply(snapshot.config, sig)
            return True

    def _apply(self, new: NodeConfig, sig: str | None) -> None:
        old, self._current = self._current, new
        self._tell(ConfigChange(self.path, True, changed_keys(old, new), sha256=sig))
        changed_now = set(restart_needed(old, new))
        pending_before = set(restart_needed(self._running, old))
        pending_now = restart_needed(self._running, new)
        for key in pending_now:
            if key in changed_now:
                log.warning("config %s changed in %s: takes effect after a restart", key, self.path)
        for key in sorted(pending_before & changed_now - set(pending_now)):
            log.info("config %s is back to the value this process runs with", key)
        log.info("config reloaded from %s", self.path)
        for callback in self._subscribers:
            try:
                callback(new)
            except Exception:
                log.exception("config reload subscriber %r failed", callback)

    def start(self) -> None:
        """Start the polling thread."""
        self._poller.start()

    def stop(self) -> None:
        """Stop the polling thread."""
        self._poller.stop()
