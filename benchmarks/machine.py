"""What every benchmark prints about the machine it ran on (figures change with the CPU)."""

from __future__ import annotations

from pathlib import Path

VECTOR_PREFIXES = ("avx", "amx", "sse4", "fma")
"""The flags that decide how fast numeric code runs here."""


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_flags() -> str:
    """The vector extensions of this CPU, sorted, or "unknown"."""
    flags = sorted(f for f in cpu_flags() if f.startswith(VECTOR_PREFIXES))
    return " ".join(flags) if flags else "unknown"
