"""Registration benchmark: TRE and time on known-transform cases, and the real MRI-DIR pair.

Run from the repository root (full data in ../shared/data, 2 threads as on the target box):

    nice -n 10 python benchmarks/registration.py [--cases 6] [--real-cases 3] [--threads 2]
                                                 [--markdown docs/registration_bench.md]

Cases (full resolution, the CT fixed):

* ``pseudo-N``: a pseudo-MR made from the real CT by a non-monotonic intensity map (air dark,
  fat bright, soft tissue mid, bone dark, with a bias field and noise), moved by a random rigid
  transform (angle up to 20 degrees about a random axis, shift up to 30 mm) and resampled onto
  an MR-like grid (0.5 x 0.5 x 2.5 mm, 512 x 512 x 90). ``pseudo-flip-N`` adds the 180 degree
  feet-first/head-first turn. Ground truth is exact.
* ``realmr-N``: the real MR moved by a random rigid transform (same limits) by rewriting its
  origin and direction (no resampling, so the pixels are the real MR's); the truth is that
  transform composed with the registration of the unmoved pair, so this measures how
  reproducibly the real MR is found from different starting poses (not its absolute accuracy,
  for which the phantom has no ground truth).
* ``pseudo-slab-N``: as ``pseudo-N`` but the MR-like grid is a 120 mm slab (1 x 1 x 3 mm)
  through the upper part of the head, so mask centres do not correspond.
* ``realmr-resampled-N``: the real MR moved by resampling it (B-spline) on its own grid; the
  resampled 2.5 mm slices are a different image, so this truth is only approximate.
* ``MRI-DIR pair``: the real CT and MR; time includes resampling the MR onto the CT grid.

TRE is the mean distance over the 8 corners of the CT head's bounding box. "CPU" is the
process CPU time of register + resample (all threads): on an otherwise idle 2-core machine the
wall time lies between CPU/2 and CPU, whatever else the shared machine was doing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion_engine.errors import RegistrationError  # noqa: E402
from fusion_engine.registration import register, resample_to  # noqa: E402
from tests.pipeline import registration_cases as rc  # noqa: E402


@dataclass
class Row:
    """One line of the result table."""

    case: str
    truth_deg: float
    truth_mm: float
    angle_deg: float
    tre_mm: float | None
    dice: float
    metric: float
    register_s: float
    resample_s: float
    cpu_s: float
    note: str


def _angle_shift(tr: sitk.Transform, center: np.ndarray) -> tuple[float, float]:
    pts = np.array([tr.TransformPoint([float(v) for v in p]) for p in np.eye(3) * 100.0 + center])
    c = np.array(tr.TransformPoint([float(v) for v in center]))
    r = (pts - c).T / 100.0
    cos = (np.trace(r) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))), float(np.linalg.norm(c - center))


def _run(
    name: str,
    ct: sitk.Image,
    moving: sitk.Image,
    truth: sitk.Transform | None,
    corners: np.ndarray,
    threads: int,
) -> tuple[Row, sitk.Transform | None]:
    center = corners.mean(axis=0)
    truth_deg, truth_mm = _angle_shift(truth, center) if truth is not None else (0.0, 0.0)
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        result = register(ct, moving, threads=threads)
    except RegistrationError as exc:
        q = exc.quality
        nan = float("nan")
        row = Row(
            name,
            truth_deg,
            truth_mm,
            q.angle_from_header_deg if q else nan,
            None,
            q.mask_dice if q else nan,
            q.metric_value if q else nan,
            time.perf_counter() - t0,
            0.0,
            time.process_time() - c0,
            f"RegistrationError (flagged unreliable): {exc}",
        )
        return row, None
    t1 = time.perf_counter()
    resample_to(ct, moving, result.transform)
    t2 = time.perf_counter()
    cpu = time.process_time() - c0
    q = result.quality
    tre = rc.tre_mm(result.transform, truth, corners) if truth is not None else None
    note = "warning: > 45 deg from header" if q.warnings else ""
    row = Row(
        name,
        truth_deg,
        truth_mm,
        q.angle_from_header_deg,
        tre,
        q.mask_dice,
        q.metric_value,
        t1 - t0,
        t2 - t1,
        cpu,
        note,
    )
    return row, result.transform


def mattes_at(ct: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes metric (ITK sign) of a pose at about 1 mm inside the CT head (> -400 HU)."""
    fixed = sitk.Cast(
        sitk.BinShrink(ct, [max(1, round(1.0 / s)) for s in ct.GetSpacing()]), sitk.sitkFloat32
    )
    mov = sitk.Cast(
        sitk.BinShrink(moving, [max(1, round(1.0 / s)) for s in moving.GetSpacing()]),
        sitk.sitkFloat32,
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricFixedMask(sitk.BinaryThreshold(fixed, -400.0, 1e9, 1, 0))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, 7)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform)
    return float(reg.MetricEvaluate(fixed, mov))


def _table(rows: list[Row]) -> str:
    head = (
        "| case | true rotation (deg) | true shift at head centre (mm) | result angle from header "
        "(deg) | TRE (mm) | head-mask Dice | Mattes metric | register (s) | resample (s) | "
        "total (s) | CPU (s) | note |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        tre = f"{r.tre_mm:.2f}" if r.tre_mm is not None else "-"
        lines.append(
            f"| {r.case} | {r.truth_deg:.1f} | {r.truth_mm:.1f} | {r.angle_deg:.1f} | {tre} | "
            f"{r.dice:.3f} | {r.metric:.3f} | {r.register_s:.1f} | {r.resample_s:.1f} | "
            f"{r.register_s + r.resample_s:.1f} | {r.cpu_s:.1f} | {r.note} |"
        )
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.case == "MRI-DIR pair":
            continue
        group = re.sub(r"(-flip)?-\d+$", "", r.case)
        groups.setdefault(group, []).append(r)
    lines.append("")
    lines.append(
        "| group | cases | mean TRE (mm) | max TRE (mm) | flagged unreliable | max total (s) "
        "| max CPU (s) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for group, members in groups.items():
        tres = [m.tre_mm for m in members if m.tre_mm is not None]
        flagged = sum(1 for m in members if m.tre_mm is None)
        mean = f"{np.mean(tres):.2f}" if tres else "-"
        worst = f"{np.max(tres):.2f}" if tres else "-"
        slowest = max(m.register_s + m.resample_s for m in members)
        cpu = max(m.cpu_s for m in members)
        lines.append(
            f"| {group} | {len(members)} | {mean} | {worst} | {flagged} | {slowest:.1f} "
            f"| {cpu:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/mridir-phantom")
    parser.add_argument("--cases", type=int, default=6, help="pseudo-MR cases (every 3rd flipped)")
    parser.add_argument("--real-cases", type=int, default=3, help="moved real-MR cases")
    parser.add_argument("--slab-cases", type=int, default=2, help="pseudo-MR 120 mm slabs")
    parser.add_argument(
        "--resampled-cases", type=int, default=2, help="real MR moved by resampling"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)

    t = time.perf_counter()
    ct = rc.read_series(args.data / "ct")
    mr = rc.read_series(args.data / "mr")
    read_s = time.perf_counter() - t
    print(f"read CT {ct.GetSize()} and MR {mr.GetSize()} in {read_s:.1f} s", flush=True)
    corners = rc.head_box_corners(ct)
    center = rc.box_center(ct)
    rows: list[Row] = []

    row, reference = _run("MRI-DIR pair", ct, mr, None, corners, args.threads)
    rows.append(row)
    print(row, flush=True)

    rng = np.random.default_rng(args.seed)
    for i in range(args.cases):
        truth: sitk.Transform = rc.random_rigid(rng, 20.0, 30.0, center)
        name = f"pseudo-{i}"
        if i % 3 == 2:
            truth = rc.compose(rc.flip_about_y(center), truth)
            name = f"pseudo-flip-{i}"
        grid = rc.mr_like_grid(
            np.array(truth.TransformPoint(center)), (0.5, 0.5, 2.5), (256.0, 256.0, 225.0)
        )
        moving = rc.pseudo_mr(ct, truth, grid, seed=i)
        row, _ = _run(name, ct, moving, truth, corners, args.threads)
        rows.append(row)
        print(row, flush=True)

    for i in range(args.slab_cases):
        truth = rc.random_rigid(rng, 20.0, 30.0, center)
        name = f"pseudo-slab-{i}"
        if i % 2 == 1:
            truth = rc.compose(rc.flip_about_y(center), truth)
            name = f"pseudo-slab-flip-{i}"
        # A 120 mm slab (1 x 1 x 3 mm) through the upper part of the head.
        slab_center = np.array(truth.TransformPoint(center)) + np.array([0.0, 0.0, 50.0])
        grid = rc.mr_like_grid(slab_center, (1.0, 1.0, 3.0), (240.0, 240.0, 120.0))
        moving = rc.pseudo_mr(ct, truth, grid, seed=100 + i)
        row, _ = _run(name, ct, moving, truth, corners, args.threads)
        rows.append(row)
        print(row, flush=True)

    if reference is not None:
        for i in range(args.real_cases):
            move = rc.random_rigid(rng, 20.0, 30.0, tuple(reference.TransformPoint(center)))
            moving = rc.moved_header(mr, move)  # same pixels, geometry moved: exact truth
            truth = rc.compose(reference, move)
            row, _ = _run(f"realmr-{i}", ct, moving, truth, corners, args.threads)
            rows.append(row)
            print(row, flush=True)
        for i in range(args.resampled_cases):
            move = rc.random_rigid(rng, 20.0, 30.0, tuple(reference.TransformPoint(center)))
            # Resampled through the inverse move onto the MR's own grid (B-spline): the pixels
            # change, so the "truth" is only as good as interpolating 2.5 mm slices allows.
            moving = sitk.Resample(
                mr, mr, move, sitk.sitkBSpline, 0.0, sitk.sitkFloat32
            )  # moving(y) = mr(move(y))
            truth = rc.compose(reference, move.GetInverse())
            row, found = _run(f"realmr-resampled-{i}", ct, moving, truth, corners, args.threads)
            note = "truth approximate (resampled)"
            if found is not None:
                note += (
                    f"; metric at result {mattes_at(ct, moving, found):.4f}, "
                    f"at truth {mattes_at(ct, moving, truth):.4f}"
                )
            row.note = (row.note + "; " if row.note else "") + note
            rows.append(row)
            print(row, flush=True)

    table = _table(rows)
    load = os.getloadavg()
    table += (
        f"\n\n{args.threads} threads; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs; CT+MR read in {read_s:.1f} s."
    )
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
