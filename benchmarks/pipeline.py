"""Pipeline benchmark: the full MRI-DIR pair through ``dicom-node fuse``.

Not a timed test. Runs the real command as a child process (exactly what a user runs), then
reports the wall time of each stage (from ``OUT/summary.json``, written by
:func:`dicom_node.imaging.pipeline.run_offline`), the whole command's wall time, and the
child's peak resident memory (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, i.e. the peak
of the largest child).

    nice -n 10 python benchmarks/pipeline.py [--ct DIR] [--mr DIR] [--out DIR]
                                             [--config node.yaml] [--markdown FILE]

Defaults: ``../shared/data/mridir-phantom/{ct,mr}`` beside the checkout, a temporary output
folder (kept with ``--out``). Thread count and device come from the config (``worker.threads``,
``worker.device``), as for the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mridir-phantom"
STAGES = ("read", "register", "resample", "fuse", "derive", "write", "preview")


def run(ct: Path, mr: Path, out: Path, config: Path | None) -> dict[str, Any]:
    """Run ``dicom-node fuse`` once; return stage times, wall time, peak RSS, quality."""
    exe = shutil.which("dicom-node")
    cmd = [exe] if exe else [sys.executable, "-m", "dicom_node.cli"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += ["fuse", "--ct", str(ct), "--mr", str(mr), "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"dicom-node fuse failed with exit code {proc.returncode}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,  # Linux: kilobytes
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "stage_seconds": summary["stage_seconds"],
        "quality": summary["quality"],
        "warnings": summary["warnings"],
        "instances": {k: v["instances"] for k, v in summary["series"].items()},
    }


def markdown(result: dict[str, Any], ct: Path, mr: Path) -> str:
    """The result as a Markdown section for the README."""
    st = result["stage_seconds"]
    lines = [
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {s} | {st[s]:.1f} |" for s in STAGES if s in st),
        f"| **whole command** (incl. start-up) | **{result['wall_seconds']:.1f}** |",
        "",
        f"Peak resident memory: {result['peak_rss_mb']:.0f} MiB; CPU time "
        f"{result['cpu_seconds']:.0f} s; "
        f"{os.cpu_count()} CPUs visible, {platform.processor() or platform.machine()}.",
        f"Outputs: {result['instances']}. Registration: metric "
        f"{result['quality']['metric_value']:.3f}, head-mask Dice "
        f"{result['quality']['mask_dice']:.3f}, "
        f"{result['quality']['angle_from_header_deg']:.0f} degrees from the header.",
        f"Input: {ct} and {mr}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, default=DATA / "ct")
    parser.add_argument("--mr", type=Path, default=DATA / "mr")
    parser.add_argument("--out", type=Path, default=None, help="keep the outputs here")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    args = parser.parse_args(argv)
    for folder in (args.ct, args.mr):
        if not folder.is_dir():
            raise SystemExit(f"{folder} not found (the full data lives in ../shared/data)")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        out = args.out or Path(tmp) / "out"
        result = run(args.ct, args.mr, out, args.config)
    text = markdown(result, args.ct, args.mr)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
