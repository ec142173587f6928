"""Page filters: local times, durations, sizes, short UIDs."""

from __future__ import annotations

from datetime import UTC, datetime

from dicom_node.console.render import duration, local_time, short_uid, size


def test_duration() -> None:
    assert duration(None) == "-"
    assert duration(4.21) == "4.2 s"
    assert duration(185) == "3 min 05 s"
    assert duration(7380) == "2 h 03 min"


def test_size() -> None:
    assert size(None) == "-"
    assert size(512) == "512 B"
    assert size(3 * 1024**3) == "3.0 GiB"


def test_local_time_of_utc() -> None:
    when = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert local_time(when) == when.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert local_time(when.replace(tzinfo=None)) == local_time(when)  # naive means UTC
    assert local_time(None) == "-"


def test_short_uid() -> None:
    assert short_uid("1.2.3") == "1.2.3"
    long_uid = "2.25.123456789012345678901234567890"
    assert short_uid(long_uid) == "…" + long_uid[-16:]
    assert short_uid(None) == "-"
