"""An embedded worker's tie to ``dicom-node serve``: it exits within seconds of serve's death.

Two mechanisms, because either alone has a gap:

1. On Linux the kernel sends SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``, set
   through ctypes). serve starts and restarts its worker from its main thread, whose end is the
   process's end, so the signal means the parent is gone. The worker's SIGTERM handler hands
   its job back and stops.
2. A daemon thread checks every :data:`POLL_SECONDS` that the parent process id is unchanged
   (other systems, or a parent that died before the ``prctl``); when it changed it sends the
   same SIGTERM, and if the worker is still alive :data:`EXIT_GRACE_SECONDS` later (stuck in
   native code), it ends the process with ``os._exit``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0
EXIT_GRACE_SECONDS = 10.0
EXIT_CODE_ORPHANED = 75
"""Exit code of a worker that had to end itself after its parent died (EX_TEMPFAIL)."""


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel for ``signum`` when the parent dies (Linux only); True when set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        result = int(libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0))
    except (OSError, AttributeError):
        return False
    return result == 0


def parent_alive(parent_pid: int) -> bool:
    """Whether this process's parent is still ``parent_pid`` (else it died: re-parented)."""
    return os.getppid() == parent_pid


def _watch(parent_pid: int, poll: float, grace: float) -> None:
    while parent_alive(parent_pid):
        time.sleep(poll)
    log.error("parent process %d is gone: worker %d stops", parent_pid, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    log.error(
        "worker %d did not stop within %.0f s of its parent's death: exiting", os.getpid(), grace
    )
    logging.shutdown()
    os._exit(EXIT_CODE_ORPHANED)


def die_with_parent(
    parent_pid: int, *, poll: float = POLL_SECONDS, grace: float = EXIT_GRACE_SECONDS
) -> None:
    """Tie this process to ``parent_pid`` (see module docstring); exit at once if it is gone."""
    set_parent_death_signal()
    if not parent_alive(parent_pid):  # the parent died before the prctl took effect
        log.error("parent process %d is gone before the worker started", parent_pid)
        raise SystemExit(EXIT_CODE_ORPHANED)
    thread = threading.Thread(
        target=_watch, args=(parent_pid, poll, grace), name="parent-watch", daemon=True
    )
    thread.start()
