"""Every change made through the console, and every login, goes through :func:`record_change`.

It logs one INFO line per event (who, from where, what) and writes it to the audit trail
(:mod:`dicom_node.audit`): logins and logouts, configuration changes (with the keys touched)
and job actions. Events never carry patient data: configuration keys and values (AE titles,
hosts, ports), job ids and user names only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_node import audit
from dicom_node.config import NodeConfig
from dicom_node.config_watcher import ConfigChange
from dicom_node.states import JobAction

log = logging.getLogger(__name__)

MAX_VALUE_CHARS = 200
"""Longest value shown in a change line (a long list is cut, not dropped)."""


class Action(StrEnum):
    """What an admin did."""

    LOGIN = "login"
    LOGIN_FAILED = "login-failed"
    LOGOUT = "logout"
    CONFIG_CHANGED = "config-changed"
    JOB_RETRIED = "job-retried"
    JOB_CANCELLED = "job-cancelled"
    ECHO = "echo"


@dataclass(frozen=True)
class Change:
    """One event: who did what to what, from which address, with what outcome."""

    actor: str
    client: str
    action: Action
    target: str
    detail: str = ""
    job_id: int | None = None
    keys: tuple[str, ...] = ()
    """The configuration keys a config change touched."""


_JOB_ACTIONS = {Action.JOB_RETRIED: JobAction.RETRY, Action.JOB_CANCELLED: JobAction.CANCEL}
_LOGINS = {Action.LOGIN: (True, False), Action.LOGIN_FAILED: (False, False)}
_LOGINS[Action.LOGOUT] = (True, True)


def record_change(change: Change, config: NodeConfig | None = None) -> None:
    """Log ``change`` and write it to the audit trail of ``config`` (the config in force)."""
    level = logging.WARNING if change.action == Action.LOGIN_FAILED else logging.INFO
    log.log(
        level,
        "console: %s from %s: %s %s%s",
        _safe(change.actor),
        change.client,
        change.action,
        _safe(change.target),
        f": {change.detail}" if change.detail else "",
    )
    if config is not None:
        _audit(change, config)


def _audit(change: Change, config: NodeConfig) -> None:
    """The audit record of a console event (an echo changes nothing and is not audited)."""
    trail = audit.trail(config)
    if change.action in _LOGINS:
        success, logout = _LOGINS[change.action]
        trail.user_authentication(
            user=change.actor, client=change.client, success=success, logout=logout
        )
    elif change.action in _JOB_ACTIONS and change.job_id is not None:
        trail.job_action(
            _JOB_ACTIONS[change.action], change.job_id, result=change.detail, user=change.actor
        )
    elif change.action == Action.CONFIG_CHANGED:
        applied = ConfigChange(path=Path(change.target), applied=True, keys=list(change.keys))
        trail.config_change(applied, ae_title=config.node.ae_title, user=change.actor)
    trail.flush()


def _safe(text: str) -> str:
    """Text from a request, escaped for a log line (no control characters, bounded length)."""
    shown = ascii(text[:MAX_VALUE_CHARS])[1:-1]
    return shown + ("..." if len(text) > MAX_VALUE_CHARS else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The keys that differ between two configurations, as ``key: old -> new`` lines."""
    lines: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines.extend(config_diff(a, b, f"{path}."))
        elif not prefix and isinstance(b, Mapping) and a is None and b:  # a new section
            lines.extend(f"{path}.{k} added: {_short(v)}" for k, v in b.items())
        elif not prefix and isinstance(a, Mapping) and b is None and a:
            lines.extend(f"{path}.{k} removed (was {_short(v)})" for k, v in a.items())
        elif key not in new:
            lines.append(f"{path} removed (was {_short(a)})")
        elif key not in old:
            lines.append(f"{path} added: {_short(b)}")
        elif a != b:
            lines.append(f"{path}: {_short(a)} -> {_short(b)}")
    return lines
