"""DCMTK's storescu and echoscu as real peers of the node (always by path, never pynetdicom's)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.peers import dcmtk

PEER_TIMEOUT = 60.0


def tls_options(
    certificate: Path | None, private_key: Path | None, ca_certificates: Path
) -> list[str]:
    """DCMTK options for DICOM TLS (its default profile: non-downgrading BCP 195): with our
    certificate and key (``+tls``), or anonymous (``+tla``) when they are None; the peer's
    certificate verified against ``ca_certificates``."""
    trust = ["+cf", str(ca_certificates)]
    if certificate is None or private_key is None:
        return ["+tla", *trust]
    return ["+tls", str(private_key), str(certificate), "-pw", *trust]


def echoscu(
    port: int, *, calling: str, called: str, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK echoscu against 127.0.0.1:``port``."""
    return subprocess.run(
        [dcmtk("echoscu"), *extra, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=PEER_TIMEOUT,
    )


def storescu(
    port: int,
    *files: Path | str,
    calling: str,
    called: str,
    extra: Sequence[str] = (),
    timeout: float = PEER_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu (verbose) sending ``files`` (or folders, with ``+sd``) to the node."""
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-v",
            *extra,
            "-aet",
            calling,
            "-aec",
            called,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        # DCMTK's sockets: no Nagle delay per small PDU (as peers are usually configured)
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def storescu_folder(
    port: int, folder: Path, *, calling: str, called: str
) -> subprocess.CompletedProcess[str]:
    """Send every file of ``folder`` with storescu; raise with its output when it fails."""
    proc = storescu(port, folder, calling=calling, called=called, extra=("+sd", "+r"), timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"storescu failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc
