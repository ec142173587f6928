"""Scale-out benchmark: CT-MR pairs per hour with 1, 2 and 3 ``dicom-node worker`` processes.

Not a timed test. For each worker count it starts what the scale-out test starts
(``tests/peers/scale_out.py``): a throwaway PostgreSQL cluster, a real Orthanc, one
``dicom-node serve`` without its worker and N workers with their own config files and host
names, all on one storage root. It sends ``--pairs`` CT-MR pairs of as many patients (the small
fixtures, or the full MRI-DIR pair with ``--full``) with DCMTK ``storescu`` and measures from the
first job queued to the last job done; pairs per hour = pairs / that time. The reference is the
1-worker figure of the same run: each line shows its speed-up over it, beside the ideal (N).

    nice -n 10 python benchmarks/scale_out.py [--workers 1,2,3] [--pairs 6] [--threads 1]
                                              [--full] [--markdown FILE]

Read the figures against the cores: N workers of ``--threads`` threads each need
N x threads cores. On the 2-core development machine, 3 single-threaded workers cannot beat 2
(they share two cores, and serve, PostgreSQL and Orthanc share them too); there the benchmark
shows the overhead of more workers rather than a gain. On a machine with one GPU or enough
cores per worker the same commands measure the real scale-out.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_flags  # noqa: E402

from dicom_node.models import Job  # noqa: E402
from dicom_node.states import JobState  # noqa: E402
from tests.peers.orthanc import Orthanc  # noqa: E402
from tests.peers.postgres import start_cluster  # noqa: E402
from tests.peers.scale_out import (  # noqa: E402
    deploy,
    deployment_sections,
    patient_pairs,
    remove_tree,
    send_pairs,
)
from tests.support.data import SMALL_CT, SMALL_MR  # noqa: E402

FULL_DATA = REPO.parent / "shared" / "data" / "mridir-phantom"
SECONDS_PER_HOUR = 3600.0


def run_once(
    work: Path,
    url: str,
    pacs: Orthanc,
    workers: int,
    source: tuple[Path, Path],
    args: argparse.Namespace,
) -> tuple[float, list[Job]]:
    """One deployment with ``workers`` workers; (seconds first queued -> last done, jobs)."""
    worker: dict[str, Any] = {"device": args.device, "threads": args.threads}
    sections = deployment_sections(
        work / "storage", url, pacs, worker=worker, pairing={"series_quiet_seconds": args.quiet}
    )
    node = deploy(work / "machines", sections, workers)
    try:
        node.wait_workers_started()
        ct, mr = source
        pairs = patient_pairs(work / "incoming", args.pairs, f"bench{workers}", ct=ct, mr=mr)
        send_pairs(node.serve.port, pairs)
        done = node.view.wait_jobs(args.pairs, states=(JobState.DONE,), timeout=args.timeout)
    finally:
        node.stop()
    first: datetime = min(j.created_at for j in done)
    last = max(j.finished_at for j in done if j.finished_at is not None)
    return (last - first).total_seconds(), done


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per worker count."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2,3", help="worker counts to measure")
    ap.add_argument("--pairs", type=int, default=6, help="CT-MR pairs (patients) per run")
    ap.add_argument("--threads", type=int, default=1, help="worker.threads of each worker")
    ap.add_argument("--device", default="cpu", help="worker.device (cpu, cuda, auto)")
    ap.add_argument("--quiet", type=float, default=1.0, help="pairing.series_quiet_seconds")
    ap.add_argument("--full", action="store_true", help="the full MRI-DIR pair (../shared)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up a run after (s)")
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    source = (FULL_DATA / "ct", FULL_DATA / "mr") if args.full else (SMALL_CT, SMALL_MR)
    if not all(folder.is_dir() for folder in source):
        print(f"data not found: {source[0]} / {source[1]}", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.workers.split(",")]
    flags = cpu_flags()
    cores = os.cpu_count() or 1
    print(
        f"{platform.processor() or platform.machine()}, {cores} CPUs, CPU flags: "
        f"{', '.join(sorted(f for f in flags if f.startswith(('avx', 'amx')))) or 'none'}"
    )
    print(
        f"{args.pairs} pairs of {'the full MRI-DIR' if args.full else 'the small fixture'} "
        f"series, device {args.device}, {args.threads} thread(s) per worker; "
        f"load average before: {os.getloadavg()[0]:.1f}"
    )
    cluster = start_cluster()
    base = Path(tempfile.mkdtemp(prefix="scale-out-bench-"))
    pacs = Orthanc(base / "orthanc").start()
    rows: list[tuple[int, float, float]] = []
    try:
        for n in counts:
            db = cluster.create_database()
            work = base / f"workers-{n}"
            t0 = time.monotonic()
            seconds, jobs = run_once(work, cluster.url(db), pacs, n, source, args)
            per_hour = args.pairs / seconds * SECONDS_PER_HOUR
            mean_job = sum(
                (j.finished_at - j.created_at).total_seconds() for j in jobs if j.finished_at
            ) / len(jobs)
            print(
                f"  {n} worker(s): {seconds:.1f} s for {args.pairs} pairs -> "
                f"{per_hour:.0f} pairs/h (mean queue-to-done {mean_job:.1f} s; "
                f"run {time.monotonic() - t0:.0f} s)"
            )
            rows.append((n, seconds, per_hour))
            remove_tree(work)
            cluster.drop_database(db)
    finally:
        pacs.stop()
        cluster.stop()
        remove_tree(base)
    reference = rows[0][2]
    lines = [
        "| workers | seconds | pairs/hour | speed-up vs 1st row | ideal | cores/threads limit |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, seconds, per_hour in rows:
        limit = min(n, max(1, cores // args.threads))
        lines.append(
            f"| {n} | {seconds:.1f} | {per_hour:.0f} | {per_hour / reference:.2f}x "
            f"| {n / rows[0][0]:.0f}x | {limit / min(rows[0][0], limit):.0f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if cores < max(counts) * args.threads:
        print(
            f"note: {cores} CPUs cannot run {max(counts)} workers of {args.threads} thread(s) at "
            "once; beyond the cores/threads limit more workers only share the same cores "
            "(serve, PostgreSQL and Orthanc run here too)."
        )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
