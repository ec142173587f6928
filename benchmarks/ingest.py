"""Ingest benchmark: DCMTK storescu -> the node vs pynetdicom's storescp vs DCMTK's storescp.

Not a timed test. In one run it sends the same series (default: the 205-slice MRI-DIR CT in
``../shared/data/mridir-phantom/ct``) with DCMTK ``storescu`` to

* ``node``: ``dicom-node serve`` (atomic write + fsync + index row per instance),
* ``pynetdicom``: ``python -m pynetdicom storescp`` (writes files, no fsync, no index),
* ``dcmtk``: DCMTK ``storescp`` (writes files, no fsync, no index),

each on a free loopback port with a fresh output folder, and prints instances/s per receiver and
the ratios to the node (the node is measured once its worker process has started, see
``READY_MARKERS``). The DCMTK programs run with ``TCP_NODELAY=1`` (without it they stall
about 40 ms per instance). Each receiver is measured ``--repeat`` times (fresh storage each time)
and the median is reported. Target: node >= 0.9 x pynetdicom storescp.

    python benchmarks/ingest.py [--data DIR] [--repeat 3] [--only node,pynetdicom,dcmtk]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mridir-phantom" / "ct"
DCMTK = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))
CALLING = "BENCHSCU"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60
) -> None:
    """Wait until ``proc`` listens on ``port``; fail with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"receiver exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        if port_open(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"receiver not listening after {timeout}s:\n{log.read_text()[-3000:]}")


Launcher = Callable[[int, str, Path, Path], tuple[list[str], dict[str, str]]]
"""Builds a receiver's command line and environment from (port, AE title, out, work folder)."""


def node_cmd(port: int, aet: str, out: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """``dicom-node serve`` with a temp config accepting any calling AE."""
    cfg = work / "node.yaml"
    cfg.write_text(
        "node:\n"
        f"  ae_title: {aet}\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "  allowed_calling_aets: ANY\n"
        "storage:\n"
        f"  root: {out}\n"
        "  min_free_mb: 1\n"
    )
    cmd = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg),
           "--port", str(port), "--ae-title", aet, "--storage", str(out)]  # fmt: skip
    return cmd, dict(os.environ)


def pynetdicom_cmd(port: int, aet: str, out: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """pynetdicom's storescp app writing into ``out``."""
    cmd = [sys.executable, "-m", "pynetdicom", "storescp", "-aet", aet, "-od", str(out), str(port)]
    return cmd, dict(os.environ)


def dcmtk_cmd(port: int, aet: str, out: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """DCMTK's storescp writing into ``out``."""
    return [str(DCMTK / "storescp"), "-aet", aet, "-od", str(out), str(port)], DCMTK_ENV


RECEIVERS: dict[str, Launcher] = {
    "node": node_cmd,
    "pynetdicom": pynetdicom_cmd,
    "dcmtk": dcmtk_cmd,
}


READY_MARKERS: dict[str, str] = {"node": " started (device "}
"""Log text a receiver prints once it is fully started. ``dicom-node serve`` listens at once
and then starts its worker process, whose imports (torch) take a few seconds of both cores:
the measurement starts after that, in the node's steady state."""


def wait_ready(proc: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 120) -> None:
    """Wait until ``marker`` appears in the receiver's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"receiver exited with {proc.returncode}:\n{tail}")
        time.sleep(0.1)
    raise RuntimeError(f"receiver not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def _is_dicom_file(path: Path) -> bool:
    """A Part 10 file: "DICM" after the 128-byte preamble."""
    with path.open("rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def count_dicom_files(folder: Path) -> int:
    """Received files below ``folder`` (any name: DCMTK storescp names them without .dcm; the
    node keeps its index, audit trail and locks beside them, which are not counted)."""
    return sum(
        1
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and _is_dicom_file(p)
    )


@dataclass
class Receiver:
    """A started receiver: its process, where it listens and where it stores and logs."""

    proc: subprocess.Popen[bytes]
    port: int
    aet: str
    out: Path
    log: Path


@contextmanager
def started(
    name: str, launch: Launcher, prefix: str, tmp_root: Path | None = None
) -> Iterator[Receiver]:
    """Start receiver ``name`` with ``launch`` in a fresh temp folder, wait until it listens
    (and, for those in ``READY_MARKERS``, until it is fully started); stop it afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-{name}-", dir=tmp_root) as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        port, aet = free_port(), "BENCHSCP"
        cmd, env = launch(port, aet, out, work)
        log = work / "receiver.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
        try:
            wait_listening(proc, port, log)
            if name in READY_MARKERS:
                wait_ready(proc, log, READY_MARKERS[name])
            yield Receiver(proc, port, aet, out, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_once(name: str, files: list[Path], data: Path, tmp_root: Path | None = None) -> float:
    """Send ``files`` to a fresh receiver ``name``; return the seconds storescu took."""
    with started(name, RECEIVERS[name], "ingest", tmp_root) as rx:
        scu = [str(DCMTK / "storescu"), "-aet", CALLING, "-aec", rx.aet, "+sd", "+r",
               "127.0.0.1", str(rx.port), str(data)]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(scu, env=DCMTK_ENV, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"storescu -> {name} failed:\n{done.stdout}{done.stderr}")
        received = count_dicom_files(rx.out)
        if received != len(files):
            raise RuntimeError(
                f"{name}: {received} of {len(files)} instances stored\n"
                f"{done.stdout}{done.stderr}\n{rx.log.read_text()[-3000:]}"
            )
        return seconds


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of DICOM files")
    ap.add_argument("--repeat", type=int, default=3, help="runs per receiver (median reported)")
    ap.add_argument("--only", default=",".join(RECEIVERS), help="comma list of receivers")
    ap.add_argument(
        "--tmp", type=Path, default=None, help="where receivers store (default: system temp)"
    )
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder {args.data} not found", file=sys.stderr)
        return 2
    files = sorted(p for p in args.data.rglob("*") if p.is_file())
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    where = args.tmp or tempfile.gettempdir()
    print(
        f"{len(files)} instances, {size_mb:.1f} MB from {args.data}; "
        f"{args.repeat} run(s) each; storage under {where}"
    )
    runs: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.repeat):  # interleave receivers so load drifts hit all alike
        for name in names:
            try:
                runs[name].append(run_once(name, files, args.data, args.tmp))
            except Exception as exc:  # report and go on with the other receivers
                print(f"{name} run {i + 1}: FAILED: {exc}", file=sys.stderr)
    rates = {n: len(files) / statistics.median(s) for n, s in runs.items() if s}
    print(f"{'receiver':<12}{'median s':>10}{'inst/s':>10}{'MB/s':>8}  runs (s)")
    for name, secs in runs.items():
        if not secs:
            print(f"{name:<12}{'failed':>10}")
            continue
        med = statistics.median(secs)
        shown = " ".join(f"{s:.2f}" for s in secs)
        print(f"{name:<12}{med:>10.2f}{rates[name]:>10.1f}{size_mb / med:>8.1f}  {shown}")
    if "node" in rates:
        for other in ("pynetdicom", "dcmtk"):
            if other in rates:
                print(f"node / {other}: {rates['node'] / rates[other]:.2f}x")
    if "node" in rates and "pynetdicom" in rates:
        ok = rates["node"] >= 0.9 * rates["pynetdicom"]
        print(f"target node >= 0.9 x pynetdicom storescp: {'met' if ok else 'NOT met'}")
    return 0 if len(rates) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
