"""Passwords only as Argon2 hashes in an owner-only file; login limits; sessions; Basic cache."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from dicom_node.console.auth import (
    MIN_PASSWORD_LENGTH,
    BasicCache,
    LoginLimiter,
    PasswordStore,
    SessionStore,
)
from dicom_node.errors import ConfigError, UsageError

PW = "a long enough password"


def test_password_stored_only_as_argon2_hash_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "storage" / "console" / "users.json"
    store = PasswordStore(path)
    assert not store.has_users()
    store.set_password("admin", PW)
    text = path.read_text()
    assert PW not in text
    entry = json.loads(text)["users"]["admin"]
    assert entry["hash"].startswith("$argon2id$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert store.verify("admin", PW)
    assert not store.verify("admin", PW + "x")
    assert not store.verify("nobody", PW)


def test_new_password_seen_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    running = PasswordStore(path)
    PasswordStore(path).set_password("admin", PW)
    assert running.verify("admin", PW)
    version = running.version()
    PasswordStore(path).set_password("admin", PW + " changed")
    assert not running.verify("admin", PW)
    assert running.verify("admin", PW + " changed")
    assert running.version() != version


def test_short_password_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=str(MIN_PASSWORD_LENGTH)):
        PasswordStore(tmp_path / "u.json").set_password("admin", "short")
    assert not (tmp_path / "u.json").exists()


def test_corrupt_password_file_means_no_login(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    path.write_text("{not json")
    store = PasswordStore(path)
    assert not store.has_users()
    assert not store.verify("admin", PW)
    with pytest.raises(ConfigError):
        store.set_password("admin", PW)


def test_limiter_per_client_and_window() -> None:
    limiter = LoginLimiter(per_client=3, per_user=100, window=0.3)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1", "admin") == 0
        limiter.failed("10.0.0.1", "admin")
    assert 0 < limiter.retry_after("10.0.0.1", "admin") <= 0.3
    assert limiter.retry_after("10.0.0.2", "admin") == 0  # another address may still try
    time.sleep(0.35)
    assert limiter.retry_after("10.0.0.1", "admin") == 0


def test_limiter_per_user_from_many_clients() -> None:
    limiter = LoginLimiter(per_client=100, per_user=4, window=60)
    for i in range(4):
        limiter.failed(f"10.0.0.{i}", "admin")
    assert limiter.retry_after("10.9.9.9", "admin") > 0
    assert limiter.retry_after("10.9.9.9", "other") == 0


def test_limiter_forgets_a_client_after_success() -> None:
    limiter = LoginLimiter(per_client=2, per_user=100, window=60)
    limiter.failed("c", "admin")
    limiter.failed("c", "admin")
    assert limiter.retry_after("c", "admin") > 0
    limiter.succeeded("c")
    assert limiter.retry_after("c", "admin") == 0


def test_sessions_expire_when_idle_and_drop() -> None:
    store = SessionStore(idle_seconds=0.2, max_seconds=10)
    token, session = store.create("admin")
    assert store.get(token) is session
    assert store.get("not-a-token") is None and store.get(None) is None
    time.sleep(0.3)
    assert store.get(token) is None
    token2, _ = store.create("admin")
    store.drop(token2)
    assert store.get(token2) is None


def test_session_ends_after_max_age_even_when_busy() -> None:
    store = SessionStore(idle_seconds=10, max_seconds=0.2)
    token, _ = store.create("admin")
    assert store.get(token) is not None
    time.sleep(0.25)
    assert store.get(token) is None


def test_session_flashes_taken_once() -> None:
    _, session = SessionStore(60).create("admin")
    session.flash("ok", "saved")
    assert session.take_flashes() == [("ok", "saved")]
    assert session.take_flashes() == []


def test_basic_cache_is_per_password_version() -> None:
    cache = BasicCache(seconds=60)
    cache.remember("admin", PW, "v1")
    assert cache.known("admin", PW, "v1")
    assert not cache.known("admin", PW, "v2")  # the password file changed
    assert not cache.known("admin", PW + "x", "v1")
    cache.clear()
    assert not cache.known("admin", PW, "v1")
