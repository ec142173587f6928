"""Processes "on other machines": each in its own UTS namespace with its own host name.

A worker's identity (and so which jobs a process may declare dead at once, see
:func:`dicom_node.orchestration.jobs.recovery.host_identity`) comes from its host name. To run
workers as if on several machines, each is started by ``unshare --uts`` under a host name of its
own; as root that needs nothing else, as another user it needs unprivileged user namespaces
(``unshare --user --map-root-user``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import pytest

from tests.peers.postgres import REQUIRE_ENV

_SET_HOSTNAME_AND_EXEC = (
    "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])"
)


def _unshare() -> list[str]:
    flags = ["--uts"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--uts"]
    return ["unshare", *flags, "--"]


def as_host(name: str) -> list[str]:
    """A command prefix running the rest of a command line under host name ``name``."""
    return [*_unshare(), sys.executable, "-c", _SET_HOSTNAME_AND_EXEC, name]


@functools.cache
def _host_namespace_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = [*as_host("probe"), sys.executable, "-c", "import socket; print(socket.gethostname())"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0 or done.stdout.strip() != "probe":
        return f"unshare --uts failed here: {done.stderr.strip()[-300:]}"
    return None


def require_host_namespaces() -> None:
    """Skip (with the reason) when processes cannot get host names of their own here; under
    the test command (``MRCT_REQUIRE_POSTGRES=1``, CI) fail instead: the scale-out test of the
    PostgreSQL backend must run there."""
    problem = _host_namespace_problem()
    if problem is None:
        return
    reason = f"cannot run processes as other hosts: {problem}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the scale-out test must run)")
    pytest.skip(reason)
