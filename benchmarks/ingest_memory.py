"""Peak memory of receiving one large instance: the node vs pynetdicom's and DCMTK's storescp.

Not a timed test. Makes one Enhanced CT instance of ``--mb`` MB (default 315: 600 frames of
512 x 512 x 16 bit, the size measured at 1.06 GB RSS on the node before streaming),
sends it once with DCMTK ``storescu`` to each receiver on a free loopback port and reads the
receiver's peak resident set size (``VmHWM`` in ``/proc/<pid>/status``) and its RSS just before
the transfer:

* ``node``: ``dicom-node serve`` (the listener process; its worker is a separate process),
* ``pynetdicom``: ``python -m pynetdicom storescp`` (decodes the dataset in memory),
* ``dcmtk``: DCMTK ``storescp`` (reads the dataset into memory, then writes it),
* ``dcmtk-bitpreserving``: DCMTK ``storescp +B`` (writes the data straight to the file).

Prints peak RSS, growth over idle and the ratio of the node's growth to each reference's, with
the CPU flags beside the figures. Target: the node's growth stays below 10% of the instance
size (received data is streamed to disk and checked in 1 MB chunks).

    python benchmarks/ingest_memory.py [--mb 315] [--only node,pynetdicom,dcmtk]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (
    DCMTK,
    DCMTK_ENV,
    Launcher,
    dcmtk_cmd,
    node_cmd,
    pynetdicom_cmd,
    started,
)
from machine import vector_flags

MB = 1024 * 1024
FRAME = 512
TARGET_GROWTH = 0.10
"""The node's RSS growth while receiving, as a fraction of the instance size, at most."""


def dcmtk_bp_cmd(port: int, aet: str, out: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """DCMTK's storescp in bit-preserving mode (streams to the file)."""
    return [str(DCMTK / "storescp"), "+B", "-aet", aet, "-od", str(out), str(port)], DCMTK_ENV


RECEIVERS: dict[str, Launcher] = {
    "node": node_cmd,
    "pynetdicom": pynetdicom_cmd,
    "dcmtk": dcmtk_cmd,
    "dcmtk-bitpreserving": dcmtk_bp_cmd,
}


def make_instance(path: Path, mb: int) -> int:
    """Write an Enhanced CT instance of about ``mb`` MB; returns its size in bytes."""
    frames = max(1, (mb * MB) // (FRAME * FRAME * 2))
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "BENCH^MEMORY", "CT"
    ds.Rows = ds.Columns = FRAME
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 4096, size=frames * FRAME * FRAME, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def rss_kib(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def measure(name: str, instance: Path, tmp_root: Path | None) -> tuple[int, int, float]:
    """(idle RSS, peak RSS in KiB, seconds) of receiver ``name`` receiving ``instance``."""
    with started(name, RECEIVERS[name], "mem", tmp_root) as rx:
        time.sleep(1.0)
        idle = rss_kib(rx.proc.pid, "VmRSS")
        scu = [str(DCMTK / "storescu"), "-aet", "BENCHSCU", "-aec", rx.aet, "127.0.0.1",
               str(rx.port), str(instance)]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(scu, env=DCMTK_ENV, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"storescu -> {name} failed:\n{done.stdout}{done.stderr}")
        return idle, rss_kib(rx.proc.pid, "VmHWM"), seconds


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=315, help="instance size in MB (default 315)")
    ap.add_argument("--only", default=",".join(RECEIVERS), help="comma list of receivers")
    ap.add_argument("--tmp", type=Path, default=None, help="where files go (default: temp)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="mem-instance-", dir=args.tmp) as tmp:
        instance = Path(tmp) / "large.dcm"
        size = make_instance(instance, args.mb)
        print(f"one Enhanced CT instance of {size / MB:.0f} MB; {platform.machine()}, "
              f"{os.cpu_count()} CPUs; CPU flags: {vector_flags()}")  # fmt: skip
        results: dict[str, tuple[int, int, float]] = {}
        for name in names:
            try:
                results[name] = measure(name, instance, args.tmp)
            except Exception as exc:  # report and go on with the other receivers
                print(f"{name}: FAILED: {exc}", file=sys.stderr)
    print(f"{'receiver':<22}{'idle MB':>9}{'peak MB':>9}{'growth MB':>11}{'seconds':>9}")
    growth = {n: (peak - idle) / 1024 for n, (idle, peak, _) in results.items()}
    for name, (idle, peak, secs) in results.items():
        print(f"{name:<22}{idle / 1024:>9.0f}{peak / 1024:>9.0f}{growth[name]:>11.0f}{secs:>9.1f}")
    if "node" in growth:
        for other, g in growth.items():
            if other != "node" and g > 0:
                print(f"node growth / {other} growth: {growth['node'] / g:.2f}x")
        ok = growth["node"] <= TARGET_GROWTH * size / MB
        print(
            f"target node growth <= {TARGET_GROWTH:.0%} of the instance "
            f"({TARGET_GROWTH * size / MB:.0f} MB): {'met' if ok else 'NOT met'}"
        )
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
