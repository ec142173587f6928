"""Keep freed memory in the process while the network runs, instead of faulting it in anew.

glibc hands out every block above its mmap threshold (128 KiB to 32 MiB) as fresh pages from
the kernel and gives them back on ``free``. A 512 x 512 slice has 64-channel activations of
64 MiB, so each layer's output is page-faulted and zeroed by the kernel again, layer after
layer: on the 2-core development machine that system time exceeded the convolutions' own
time (benchmarks/fusion_speed.py). Inside :func:`reuse_freed_memory` freed blocks stay in the
heap for the next layer (``mallopt``: no mmap, no trimming); on leaving, glibc's defaults
come back and ``malloc_trim`` returns the memory to the system, so an idle worker does not
hold its peak.

Nested and concurrent uses share one setting (a counter under a lock). On other C libraries
the context does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's defaults for both thresholds
_DEFAULT_MMAP_MAX = 65536
_NEVER = -1  # "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (mallopt(3))

_lock = threading.Lock()
_users = 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, when this process runs on it."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _glibc_malloc() -> ctypes.CDLL | None:
    """glibc with ``mallopt`` and ``malloc_trim``, else None."""
    libc = _libc()
    if libc is None or not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


def supported() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything here (Linux with glibc)."""
    return _glibc_malloc() is not None


def _keep(libc: ctypes.CDLL) -> None:
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER)


def _release(libc: ctypes.CDLL) -> None:
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
    libc.malloc_trim(0)


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, freed memory is kept for reuse; afterwards it goes back to the OS."""
    global _users
    libc = _glibc_malloc()
    if libc is None:
        yield
        return
    with _lock:
        _users += 1
        if _users == 1:
            _keep(libc)
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _release(libc)
