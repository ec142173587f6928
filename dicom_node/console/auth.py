"""Who may use the console: password hashes, login rate limits and sessions (no HTTP here).

Passwords are stored only as Argon2id hashes (argon2-cffi's defaults, RFC 9106's second
recommended setting) in a JSON file readable by its owner alone (mode 0600, in a folder of mode
0700), by default ``<storage.root>/console/users.json``, written atomically by
``dicom-node admin set-password``. The console re-reads the file when it changes, so a new
password works without a restart. No password file, no login: the console is never open.

Failed logins are limited per client address and per user name within a sliding window;
sessions live in the ``serve`` process's memory (a restart logs everyone out) and end after
``http.session_idle_minutes`` without a request, or after :data:`SESSION_MAX_SECONDS`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from dicom_node.errors import ConfigError, UsageError
from dicom_node.storage.fsutil import fsync_dir, make_dirs, write_text_durably

log = logging.getLogger(__name__)

ADMIN_USER = "admin"
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
PASSWORD_FILE_MODE = 0o600
PASSWORD_DIR_MODE = 0o700
PASSWORD_FILE_FORMAT = 1

MAX_FAILURES_PER_CLIENT = 5
"""Failed logins from one address within :data:`FAILURE_WINDOW_SECONDS` before it must wait."""
MAX_FAILURES_PER_USER = 20
"""Failed logins for one user name (from anywhere) within the window before it must wait."""
FAILURE_WINDOW_SECONDS = 300.0

SESSION_MAX_SECONDS = 12 * 3600.0
"""A session ends this long after its login, however busy (one working day)."""
BASIC_CACHE_SECONDS = 60.0
"""How long a verified HTTP Basic credential is trusted without hashing it again."""

_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))
"""Verified against when the user is unknown, so timing does not tell which names exist."""


def _now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_new_password(password: str) -> None:
    """Refuse passwords that are too short or too long (``UsageError``)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UsageError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UsageError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")


class PasswordStore:
    """The console's users and their Argon2 password hashes, in one owner-only JSON file."""

    def __init__(self, path: Path) -> None:
        """Use the password file at ``path`` (it need not exist yet)."""
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[str, str] = {}

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": PASSWORD_FILE_FORMAT, "users": {}}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: cannot read the console password file: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
            raise ConfigError(f"{self.path}: not a console password file")
        return data

    def _hashes_now(self) -> dict[str, str]:
        """The current hashes, re-read when the file changed (set-password while running)."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                users = self._read()["users"] if stamp is not None else {}
                self._hashes = {
                    str(name): str(entry["hash"])
                    for name, entry in users.items()
                    if isinstance(entry, dict) and isinstance(entry.get("hash"), str)
                }
                self._stamp = stamp
            return dict(self._hashes)

    def version(self) -> str:
        """Changes whenever the password file changes (cached credentials then expire)."""
        self._hashes_now()
        return repr(self._stamp)

    def has_users(self) -> bool:
        """At least one user has a password (else nobody can log in)."""
        try:
            return bool(self._hashes_now())
        except ConfigError:
            log.exception("console password file unusable: nobody can log in")
            return False

    def verify(self, user: str, password: str) -> bool:
        """True when ``password`` is ``user``'s (constant work whether or not the user exists)."""
        try:
            stored = self._hashes_now().get(user)
        except ConfigError:
            log.exception("console password file unusable: login refused")
            stored = None
        try:
            return _HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def set_password(self, user: str, password: str) -> None:
        """Store the hash of ``user``'s new password (atomic, owner-only file and folder)."""
        check_new_password(password)
        with self._lock:
            data = self._read()
            data["format"] = PASSWORD_FILE_FORMAT
            data["users"][user] = {"hash": _HASHER.hash(password), "changed": _now_utc()}
            folder = self.path.parent
            make_dirs(folder)
            os.chmod(folder, PASSWORD_DIR_MODE)
            write_text_durably(
                self.path, json.dumps(data, indent=1) + "\n", mode=PASSWORD_FILE_MODE
            )
            os.chmod(self.path, PASSWORD_FILE_MODE)  # an older file may have had another mode
            fsync_dir(folder)
            self._stamp = None


class LoginLimiter:
    """Sliding-window counts of failed logins per client address and per user name."""

    def __init__(
        self,
        *,
        per_client: int = MAX_FAILURES_PER_CLIENT,
        per_user: int = MAX_FAILURES_PER_USER,
        window: float = FAILURE_WINDOW_SECONDS,
    ) -> None:
        """Allow ``per_client`` / ``per_user`` failures within ``window`` seconds."""
        self.per_client = per_client
        self.per_user = per_user
        self.window = window
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, client: str, user: str) -> float:
        """Seconds until ``client`` may try ``user`` again (0: now)."""
        now = time.monotonic()
        waits = [0.0]
        with self._lock:
            for key, limit in (
                (f"client:{client}", self.per_client),
                (f"user:{user}", self.per_user),
            ):
                times = self._recent(key, now)
                if len(times) >= limit:
                    waits.append(times[len(times) - limit] + self.window - now)
        return max(waits)

    def failed(self, client: str, user: str) -> int:
        """Record a failure; returns the client's failures within the window."""
        now = time.monotonic()
        with self._lock:
            self._recent(f"user:{user}", now).append(now)
            times = self._recent(f"client:{client}", now)
            times.append(now)
            if len(self._failures) > 10_000:  # a scan from many addresses: forget the oldest
                for key in list(self._failures)[:5_000]:
                    del self._failures[key]
            return len(times)

    def succeeded(self, client: str) -> None:
        """Forget a client's failures after it logged in."""
        with self._lock:
            self._failures.pop(f"client:{client}", None)


@dataclass
class Session:
    """One logged-in browser: its user, CSRF token, times and pending messages."""

    user: str
    csrf: str
    created: float
    last_seen: float
    flashes: list[tuple[str, str]] = field(default_factory=list)

    def flash(self, level: str, message: str) -> None:
        """Queue a message for the next page this session sees."""
        self.flashes.append((level, message))

    def take_flashes(self) -> list[tuple[str, str]]:
        """The queued messages, emptied."""
        taken, self.flashes = self.flashes, []
        return taken


def _token_key(token: str) -> str:
    """Sessions are looked up by a digest of the cookie, never by the cookie itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """Sessions of the console in memory, keyed by a digest of their cookie."""

    def __init__(self, idle_seconds: float, max_seconds: float = SESSION_MAX_SECONDS) -> None:
        """Sessions end after ``idle_seconds`` without use or ``max_seconds`` after login."""
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, user: str) -> tuple[str, Session]:
        """A new session for ``user``: its cookie value and the session."""
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        session = Session(user=user, csrf=secrets.token_urlsafe(32), created=now, last_seen=now)
        with self._lock:
            self._expire(now)
            self._sessions[_token_key(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session of a cookie value (and mark it used), or None."""
        if not token:
            return None
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(_token_key(token))
            if session is not None:
                session.last_seen = now
            return session

    def drop(self, token: str | None) -> None:
        """End a session (logout)."""
        if token:
            with self._lock:
                self._sessions.pop(_token_key(token), None)

    def _expire(self, now: float) -> None:
        dead = [
            key
            for key, s in self._sessions.items()
            if now - s.last_seen > self.idle_seconds or now - s.created > self.max_seconds
        ]
        for key in dead:
            del self._sessions[key]


class BasicCache:
    """Recently verified HTTP Basic credentials, so API calls do not each cost an Argon2 hash.

    Keyed by an HMAC of user and password under a key that lives only in this process.
    """

    def __init__(self, seconds: float = BASIC_CACHE_SECONDS) -> None:
        """Trust a verified credential for ``seconds``."""
        self.seconds = seconds
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}

    def _digest(self, user: str, password: str) -> str:
        msg = user.encode() + b"\0" + password.encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def known(self, user: str, password: str, version: str) -> bool:
        """The credential was verified less than ``seconds`` ago against password file
        ``version`` (see :meth:`PasswordStore.version`)."""
        now = time.monotonic()
        with self._lock:
            until = self._until.get(self._digest(user, password + "\0" + version))
            return until is not None and until > now

    def remember(self, user: str, password: str, version: str) -> None:
        """Record a credential that just verified against password file ``version``."""
        now = time.monotonic()
        with self._lock:
            self._until = {k: t for k, t in self._until.items() if t > now}
            self._until[self._digest(user, password + "\0" + version)] = now + self.seconds

    def clear(self) -> None:
        """Forget every credential (after a password change)."""
        with self._lock:
            self._until.clear()
