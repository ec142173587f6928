"""Registration validation suite and speed: known-truth MR-like cases, negatives, the real pair.

Run from the repository root (full data in ../shared/data; 2 threads as on the target box):

    nice -n 10 python benchmarks/registration.py [--cases 36] [--markdown FILE]
        [--snapshots docs/registration_landmarks] [--negatives 3,5,10,20] [--quick]

Sets (see docs/registration.md for the tables it prints):

* positive: ``--cases`` MR-like series made from the real MRI-DIR CT (T1-, T2- and FLAIR-like;
  bias field, Rician noise; axial 2-D 4-6 mm, sagittal 3-D, coronal, oblique, slabs of 40-60 mm,
  a small field of view), moved by truths up to 30 degrees and 40 mm, every fourth also turned
  feet-first. TRE over the CT head inside the MR's field of view (mean and max).
* perturbed: every positive result moved by 3, 5, 10 and 20 mm and by as many degrees (about
  the head centre, random direction) and checked by ``check_pair``.
* mirrored: every sixth positive MR flipped left-right (an improper transform).
* other subject: MR-like series of the CT deformed as another head would be (scaled 8-12 %
  per axis, warped by a random 8 mm field), synthetic heads of nested ellipsoids, and stacks of
  human brain MR slices from AANLIB (when ../shared/data/aanlib-ct-mri is present).
* real pair: the MRI-DIR CT and MR, landmark TRE (docs/registration_landmarks.json), the
  optimum's spread between independent sample sets, and a check with an independent metric
  (ITK Mattes MI over the CT head at half resolution, 32 bins, the independent metric).

Speed is reported with the CPU flags and as a ratio to a reference kernel timed in the same run
(one million trilinear look-ups, the operation the metric spends its time in).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import vector_flags  # noqa: E402

from fusion_engine.errors import RegistrationError  # noqa: E402
from fusion_engine.registration import api, register, resample_to  # noqa: E402
from fusion_engine.registration import geometry as geo  # noqa: E402
from fusion_engine.registration.pair import FINAL_LEVEL  # noqa: E402
from fusion_engine.registration.quality import RegistrationQuality, mean_shift  # noqa: E402
from fusion_engine.registration.refine import FINAL_STEPS, newton_search  # noqa: E402
from tests.fusion_engine.registration import cases, synth  # noqa: E402

LANDMARKS = REPO / "docs" / "registration_landmarks.json"
AMOUNTS = (3.0, 5.0, 10.0, 20.0)


@dataclass
class Row:
    """One registration or check and what came of it."""

    group: str
    case: str
    flagged: bool
    summary: str
    tre_mean: float = float("nan")
    tre_max: float = float("nan")
    seconds: float = 0.0
    cpu: float = 0.0
    warnings: list[str] = field(default_factory=list)
    note: str = ""


def reference_seconds() -> float:
    """Median time of one million trilinear look-ups in a 256^3 float32 volume."""
    rng = np.random.default_rng(0)
    vol = rng.random((256, 256, 256), dtype=np.float32)
    coords = np.sort(rng.uniform(0, 255, size=(3, 1_000_000)), axis=1)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        ndimage.map_coordinates(vol, coords, order=1)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _quality_of(exc: RegistrationError) -> RegistrationQuality | None:
    q = exc.quality
    return q if isinstance(q, RegistrationQuality) else None


def run_register(
    group: str, name: str, ct: sitk.Image, moving: sitk.Image, threads: int
) -> tuple[Row, api.RegistrationResult | None]:
    """Register and time; a refusal is a flagged row (no result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = register(ct, moving, threads=threads)
    except RegistrationError as exc:
        q = _quality_of(exc)
        row = Row(group, name, True, q.summary() if q else str(exc))
        row.seconds, row.cpu = time.perf_counter() - t0, time.process_time() - c0
        row.note = str(exc)[:160]
        return row, None
    q = result.quality
    row = Row(group, name, False, q.summary(), warnings=list(q.warnings))
    row.seconds, row.cpu = time.perf_counter() - t0, time.process_time() - c0
    return row, result


def positives(
    source: cases.Source, count: int, seed: int, threads: int
) -> list[tuple[Row, cases.Case, api.RegistrationResult | None]]:
    """Register every positive case and measure its TRE."""
    out = []
    for spec in cases.catalogue(count, seed):
        case = source.build(spec)
        row, result = run_register("positive", spec.name, source.ct, case.moving, threads)
        if result is not None:
            err = cases.tre(result.transform, case.truth, source.head, case.moving)
            row.tre_mean, row.tre_max = err.mean_mm, err.max_mm
        row.note = f"{spec.degrees:.0f} deg, {np.linalg.norm(spec.shift_mm):.0f} mm" + (
            ", feet-first" if spec.feet_first else ""
        )
        print(row, flush=True)
        out.append((row, case, result))
    return out


def perturbed(
    source: cases.Source,
    done: list[tuple[Row, cases.Case, api.RegistrationResult | None]],
    threads: int,
    amounts: tuple[float, ...],
) -> list[Row]:
    """Every correct result moved by each amount (mm and degrees), checked."""
    rows = []
    for _, case, result in done:
        if result is None:
            continue
        pair = api.prepare_pair(source.ct, case.moving, threads)
        for kind in ("mm", "deg"):
            for amount in amounts:
                moved = cases.perturbed(
                    result.transform, kind, amount, source.center, seed=int(amount)
                )
                err = cases.tre(moved, case.truth, source.head, case.moving)
                c0 = time.process_time()
                quality = api.check_pair(pair, moved)
                row = Row(
                    f"perturbed {amount:g} {kind}",
                    case.spec.name,
                    not quality.reliable,
                    quality.summary(),
                    err.mean_mm,
                    err.max_mm,
                )
                row.cpu = time.process_time() - c0
                rows.append(row)
        print(rows[-1], flush=True)
    return rows


def mirrored(
    source: cases.Source,
    done: list[tuple[Row, cases.Case, api.RegistrationResult | None]],
    threads: int,
    every: int,
) -> list[Row]:
    """Left-right-flipped copies of every ``every``-th positive MR."""
    rows = []
    for row, case, _ in done[::every]:
        flipped = synth.mirrored(case.moving)
        out, _ = run_register("mirrored", row.case, source.ct, flipped, threads)
        print(out, flush=True)
        rows.append(out)
    return rows


def other_subjects(source: cases.Source, threads: int, aanlib: Path) -> list[Row]:
    """MRs of other subjects registered against the CT: all must be refused."""
    rows = []
    clean = synth.clean_ct(source.ct)
    specs = cases.catalogue(6, 99)
    for i, (scale, warp) in enumerate(
        [((0.9, 1.1, 0.92), 8.0), ((1.12, 0.9, 1.05), 8.0), ((0.92, 0.92, 1.1), 6.0)]
    ):
        other = synth.deformed(clean, scale, warp, seed=i)
        for spec in specs[2 * i : 2 * i + 2]:
            signal = synth.tissue_signal(other, synth.CONTRASTS[spec.contrast])
            truth = cases.truth_of(spec, source.center)
            grid = cases.grid_of(spec.acquisition, truth, source.head)
            mr = synth.mr_like(signal, truth, grid, bias=spec.bias, noise=spec.noise, seed=i)
            name = f"deformed {scale} warp {warp:g} mm, {spec.acquisition.name} {spec.contrast}"
            rows.append(run_register("other subject", name, source.ct, mr, threads)[0])
            print(rows[-1], flush=True)
    for contrast in ("T1", "T2"):
        grid = synth.Grid(np.eye(3), 1.0, 4.0, (240.0, 240.0, 200.0), np.array(source.center))
        head = synth.ellipsoid_head(grid, synth.CONTRASTS[contrast], seed=1)
        rows.append(
            run_register("other subject", f"ellipsoid head {contrast}", source.ct, head, threads)[0]
        )
        print(rows[-1], flush=True)
    rows += aanlib_subjects(source, threads, aanlib)
    return rows


def aanlib_volume(folder: Path, case: str, center: np.ndarray) -> sitk.Image | None:
    """AANLIB MR slices of one case stacked into a volume (0.9 x 0.9 x 5 mm, axial)."""
    from PIL import Image

    files = sorted((folder / "MRI").glob(f"{case}[0-9][0-9][0-9].png"))
    if len(files) < 8:
        return None
    arr = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float32) for f in files])
    img = sitk.GetImageFromArray(arr[::-1].copy())  # file order runs top to bottom
    img.SetSpacing((0.9, 0.9, 5.0))
    half = (np.array(img.GetSize(), dtype=np.float64) - 1.0) * np.array(img.GetSpacing()) / 2
    img.SetOrigin([float(v) for v in center - half])
    return img


def aanlib_subjects(source: cases.Source, threads: int, folder: Path) -> list[Row]:
    """Human brain MR (AANLIB slices stacked into volumes) against the porcine CT."""
    rows: list[Row] = []
    if not folder.is_dir():
        print(f"AANLIB not found in {folder}: human-subject cases skipped", flush=True)
        return rows
    for case in ("20", "28", "34"):
        volume = aanlib_volume(folder, case, np.array(source.center))
        if volume is None:
            continue
        rows.append(
            run_register(
                "other subject", f"AANLIB case {case} (human MR)", source.ct, volume, threads
            )[0]
        )
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- the real pair


def landmark_tre(transform: sitk.Transform) -> dict[str, object]:
    """TRE of ``transform`` at the committed landmarks, and their own best rigid fit."""
    data = json.loads(LANDMARKS.read_text())["landmarks"]
    ct = np.array([lm["ct"] for lm in data])
    mr = np.array([lm["mr"] for lm in data])
    mapped = cases.map_points(transform, ct)
    err = np.linalg.norm(mapped - mr, axis=1)
    fit_r, fit_t = _rigid_fit(ct, mr)
    residual = np.linalg.norm(ct @ fit_r.T + fit_t - mr, axis=1)
    loo = []
    for i in range(len(ct)):
        keep = np.arange(len(ct)) != i
        r, t = _rigid_fit(ct[keep], mr[keep])
        loo.append(float(np.linalg.norm(r @ ct[i] + t - mr[i])))
    return {
        "ids": [lm["id"] for lm in data],
        "errors": err.round(2).tolist(),
        "mean": float(err.mean()),
        "max": float(err.max()),
        "fit_residual_mean": float(residual.mean()),
        "fit_loo_mean": float(np.mean(loo)),
        "to_fit_mean": float(np.linalg.norm(mapped - (ct @ fit_r.T + fit_t), axis=1).mean()),
    }


def _rigid_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation and shift mapping ``src`` rows onto ``dst`` rows (Kabsch)."""
    sc, dc = src.mean(axis=0), dst.mean(axis=0)
    u, _, vt = np.linalg.svd((src - sc).T @ (dst - dc))
    d = np.diag([1.0, 1.0, float(np.sign(np.linalg.det(vt.T @ u.T)))])
    r = vt.T @ d @ u.T
    return r, dc - r @ sc


def mattes_half_resolution(ct: sitk.Image) -> tuple[sitk.ImageRegistrationMethod, sitk.Image]:
    """Issue #10's independent metric: ITK Mattes MI, 32 bins, CT fixed at half resolution,
    samples over the CT head (> -400 HU) (10 %, fixed seed), the MR moving; and that CT."""
    factors = [2 if s < 1.0 else 1 for s in ct.GetSpacing()]
    fixed = sitk.Cast(sitk.BinShrink(ct, factors), sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricFixedMask(sitk.BinaryThreshold(fixed, -400.0, 1e9, 1, 0))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 7)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(0.5, 0.01, 100, 0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg, fixed


def independent_optimum(
    ct: sitk.Image, mr: sitk.Image, delivered: sitk.Transform, threads: int
) -> dict[str, float]:
    """Optimise the independent metric from the delivered pose and from 2 mm / 2 degree
    perturbations of it; how far its optimum lies from the delivered pose."""
    reg, fixed = mattes_half_resolution(ct)
    reg.SetNumberOfThreads(threads)
    moving = sitk.Cast(mr, sitk.sitkFloat32)
    points = cases.head_points(ct, 5000)
    c = points.mean(axis=0)
    center = (float(c[0]), float(c[1]), float(c[2]))
    starts = [delivered] + [
        cases.perturbed(delivered, kind, 2.0, center, seed=1) for kind in ("mm", "deg")
    ]
    reg.SetInitialTransform(sitk.VersorRigid3DTransform(delivered), inPlace=False)
    at_delivered = float(reg.MetricEvaluate(fixed, moving))
    ends = []
    for start in starts:
        versor = sitk.VersorRigid3DTransform()
        versor.SetCenter(center)
        a, b = geo.affine_of(start)
        versor.SetMatrix([float(v) for v in geo.orthonormalize(a).ravel()])
        versor.SetTranslation([float(v) for v in a @ np.array(center) + b - np.array(center)])
        reg.SetInitialTransform(versor, inPlace=True)
        reg.Execute(fixed, moving)
        ends.append((float(reg.GetMetricValue()), versor))
    best_value, best = min(ends, key=lambda e: e[0])
    spread = [cases.tre(e[1], best, points, None).mean_mm for e in ends]
    return {
        "metric_at_delivered": at_delivered,
        "metric_at_optimum": best_value,
        "optimum_to_delivered_mm": cases.tre(best, delivered, points, None).mean_mm,
        "optimum_spread_mm": float(max(spread)),
        "optimum_landmark_tre_mean": float(landmark_tre(best)["mean"]),  # type: ignore[arg-type]
    }


def sample_spread(ct: sitk.Image, mr: sitk.Image, delivered: sitk.Transform, threads: int) -> float:
    """Largest distance (mm, mean over the MR head) between optima of the final metric with
    independent sample sets, started from the delivered pose: the result's own precision."""
    pair = api.prepare_pair(ct, mr, threads)
    pose = api.to_pose(delivered)
    points = pair.mr_points(3000)
    ends = []
    for seed in (101, 202, 303):
        sim = pair.level_similarity(FINAL_LEVEL, seed=seed)
        end = newton_search(sim, [pose], pair.mr_center, *FINAL_STEPS)[0]
        ends.append((end.matrix, end.offset))
    ends.append(pose)
    return max(mean_shift(a, b, points) for a in ends for b in ends)


def real_pair(data: Path, threads: int) -> tuple[Row, dict[str, object], sitk.Transform | None]:
    """The MRI-DIR CT and MR: registration, landmarks, precision, independent metric."""
    ct = cases.read_volume(data / "ct")
    mr = cases.read_volume(data / "mr")
    t0, c0 = time.perf_counter(), time.process_time()
    result = register(ct, mr, threads=threads, accept_unreliable=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    resample_to(ct, mr, result.transform)
    resample = time.perf_counter() - t1
    q = result.quality
    row = Row(
        "real",
        "MRI-DIR pair",
        not q.reliable,
        q.summary(),
        seconds=seconds,
        cpu=cpu,
        warnings=list(q.warnings),
        note=f"resample {resample:.1f} s",
    )
    info: dict[str, object] = {
        "landmarks": landmark_tre(result.transform),
        "precision_mm": sample_spread(ct, mr, result.transform, threads),
        "independent": independent_optimum(ct, mr, result.transform, threads),
        "angle": q.angle_from_header_deg,
        "dice": q.mask_dice,
        "metric": q.metric_value,
    }
    print(row, info, flush=True)
    return row, info, result.transform


# ----------------------------------------------------------------------------- snapshots

SNAP_MM = 15.0
SNAP_PX = 200


def _crop(image: sitk.Image, point: list[float], dz: int, window: tuple[float, float]) -> object:
    """An axial crop (+-SNAP_MM) of ``image`` through ``point`` (slice offset ``dz``) with a
    cross at the point, as an RGB PIL image."""
    from PIL import Image, ImageDraw

    arr = sitk.GetArrayViewFromImage(image)
    ci = np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
    r = int(SNAP_MM / image.GetSpacing()[0])
    z = round(float(ci[2])) + dz
    y0, x0 = round(float(ci[1])) - r, round(float(ci[0])) - r
    padded = np.pad(np.asarray(arr[min(max(z, 0), arr.shape[0] - 1)]), r + 1)
    patch = padded[y0 + r + 1 : y0 + 3 * r + 1, x0 + r + 1 : x0 + 3 * r + 1]
    lo, hi = window
    grey = (np.clip((patch - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    im = Image.fromarray(grey).resize((SNAP_PX, SNAP_PX), Image.Resampling.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(im)
    cx = (ci[0] - x0 + 0.5) / (2 * r) * SNAP_PX
    cy = (ci[1] - y0 + 0.5) / (2 * r) * SNAP_PX
    colour = (255, 60, 60) if dz == 0 else (150, 60, 60)
    for a, b in (((-9, 0), (-3, 0)), ((3, 0), (9, 0)), ((0, -9), (0, -3)), ((0, 3), (0, 9))):
        draw.line([(cx + a[0], cy + a[1]), (cx + b[0], cy + b[1])], fill=colour, width=2)
    draw.text((3, 3), f"slice {dz:+d}" if dz else "landmark slice", fill=(255, 255, 0))
    return im


def snapshots(data: Path, folder: Path) -> None:
    """One PNG per landmark: the CT (axial, 30 mm) and the MR slices through the pocket."""
    from PIL import Image, ImageDraw

    ct = cases.read_volume(data / "ct")
    mr = cases.read_volume(data / "mr")
    mr_hi = float(np.percentile(sitk.GetArrayViewFromImage(mr), 99.5))
    folder.mkdir(parents=True, exist_ok=True)
    for lm in json.loads(LANDMARKS.read_text())["landmarks"]:
        tiles = [_crop(ct, lm["ct"], 0, (-200.0, 400.0))]
        tiles += [_crop(mr, lm["mr"], dz, (0.0, mr_hi)) for dz in (-1, 0, 1)]
        sheet = Image.new("RGB", (4 * (SNAP_PX + 4), SNAP_PX + 36), (0, 0, 0))
        for k, tile in enumerate(tiles):
            sheet.paste(tile, (k * (SNAP_PX + 4), 0))  # type: ignore[arg-type]
        ct_txt = ", ".join(f"{v:.1f}" for v in lm["ct"])
        mr_txt = ", ".join(f"{v:.1f}" for v in lm["mr"])
        draw = ImageDraw.Draw(sheet)
        draw.text(
            (3, SNAP_PX + 4),
            f"{lm['id']} CT ({ct_txt}) mm, window -200..400 HU",
            fill=(255, 255, 255),
        )
        draw.text(
            (3, SNAP_PX + 19), f"MR ({mr_txt}) mm: slices below, at, above", fill=(255, 255, 255)
        )
        sheet.save(folder / f"{lm['id']}.png", optimize=True)
    print(f"snapshots written to {folder}", flush=True)


# ----------------------------------------------------------------------------- tables


def _fmt(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.2f}"


def table(rows: list[Row], with_tre: bool) -> str:
    """Markdown table of ``rows``."""
    head = "| set | case | flagged | evidence | "
    head += "TRE mean / max (mm) | " if with_tre else ""
    head += "time (s) | CPU (s) | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tre = f"{_fmt(r.tre_mean)} / {_fmt(r.tre_max)} | " if with_tre else ""
        note = r.note or ("; ".join(w[:60] for w in r.warnings))
        lines.append(
            f"| {r.group} | {r.case} | {'yes' if r.flagged else 'no'} | {r.summary} | {tre}"
            f"{r.seconds:.1f} | {r.cpu:.1f} | {note} |"
        )
    return "\n".join(lines)


def targets(pos: list[Row], neg: list[Row], flips: list[Row], others: list[Row]) -> str:
    """The issue's targets against what was measured."""
    tres = [r.tre_mean for r in pos if not r.flagged]
    maxes = [r.tre_max for r in pos if not r.flagged]
    false_rejects = sum(r.flagged for r in pos)
    big = [r for r in neg if r.tre_mean >= 5.0]
    small = [r for r in neg if r.tre_mean < 5.0]
    lines = [
        "| target | measured | met |",
        "|---|---|---|",
        f"| positive cases: mean TRE <= 1 mm | mean of means {np.mean(tres):.2f} mm, worst mean "
        f"{np.max(tres):.2f} mm ({len(tres)} cases) | {'yes' if np.max(tres) <= 1 else 'no'} |",
        f"| positive cases: max TRE <= 2 mm | worst {np.max(maxes):.2f} mm | "
        f"{'yes' if np.max(maxes) <= 2 else 'no'} |",
        f"| false rejects 0 | {false_rejects} of {len(pos)} | "
        f"{'yes' if not false_rejects else 'no'} |",
        f"| misregistrations >= 5 mm flagged >= 95 % | {sum(r.flagged for r in big)} of {len(big)}"
        f" ({100.0 * sum(r.flagged for r in big) / max(len(big), 1):.1f} %) | "
        f"{'yes' if sum(r.flagged for r in big) >= 0.95 * len(big) else 'no'} |",
        f"| (reported) perturbations below 5 mm mean TRE flagged | {sum(r.flagged for r in small)}"
        f" of {len(small)} | - |",
        f"| LR flips flagged 100 % | {sum(r.flagged for r in flips)} of {len(flips)} | "
        f"{'yes' if all(r.flagged for r in flips) else 'no'} |",
        f"| wrong subject flagged 100 % | {sum(r.flagged for r in others)} of {len(others)} | "
        f"{'yes' if all(r.flagged for r in others) else 'no'} |",
    ]
    return "\n".join(lines)


def perturbation_table(neg: list[Row]) -> str:
    """Flag rate per perturbation kind and amount."""
    groups: dict[str, list[Row]] = {}
    for r in neg:
        groups.setdefault(r.group, []).append(r)
    lines = [
        "| perturbation | cases | mean TRE of the moved pose (mm) | flagged |",
        "|---|---|---|---|",
    ]
    for name, members in groups.items():
        lines.append(
            f"| {name} | {len(members)} | {np.mean([m.tre_mean for m in members]):.1f} | "
            f"{sum(m.flagged for m in members)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the suite and print (and optionally write) the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/mridir-phantom")
    parser.add_argument("--aanlib", type=Path, default=REPO.parent / "shared/data/aanlib-ct-mri")
    parser.add_argument("--cases", type=int, default=36)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--negatives", default="3,5,10,20", help="perturbations (mm / degrees)")
    parser.add_argument("--mirror-every", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="6 cases, 5 mm perturbations only")
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    parser.add_argument("--snapshots", type=Path, help="write landmark PNGs into this folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.negatives, args.mirror_every = 6, "5", 3
    amounts = tuple(float(v) for v in args.negatives.split(",") if v)
    ref = reference_seconds()
    header = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags: "
        f"{vector_flags()}; {args.threads} threads; reference kernel (10^6 trilinear look-ups) "
        f"{ref * 1000:.0f} ms"
    )
    print(header, flush=True)
    if args.snapshots:
        snapshots(args.data, args.snapshots)
    real_row, real_info, _ = real_pair(args.data, args.threads)
    source = cases.Source.of(cases.read_volume(args.data / "ct"))
    done = positives(source, args.cases, args.seed, args.threads)
    pos = [r for r, _, _ in done]
    neg = perturbed(source, done, args.threads, amounts)
    flips = mirrored(source, done, args.threads, args.mirror_every)
    others = other_subjects(source, args.threads, args.aanlib)
    report = render(header, ref, pos, neg, flips, others, real_row, real_info)
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    return 0


def render(
    header: str,
    ref: float,
    pos: list[Row],
    neg: list[Row],
    flips: list[Row],
    others: list[Row],
    real_row: Row,
    real_info: dict[str, object],
) -> str:
    """The whole markdown report."""
    load = os.getloadavg()
    times = [r.seconds for r in pos] + [real_row.seconds]
    cpus = [r.cpu for r in pos] + [real_row.cpu]
    parts = [
        f"Machine: {header}; load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}.",
        "",
        "### Targets",
        targets(pos, neg, flips, others),
        "",
        f"Speed: register (with the check) median {np.median(times):.1f} s, max {max(times):.1f} s"
        f" wall; median {np.median(cpus):.1f} s, max {max(cpus):.1f} s CPU = "
        f"{np.median(cpus) / ref:.0f} / {max(cpus) / ref:.0f} x the reference kernel.",
        "",
        "### The real MRI-DIR pair",
        table([real_row], False),
        "",
        "```",
        json.dumps(real_info, indent=1),
        "```",
        "",
        "### Positive cases",
        table(pos, True),
        "",
        "### Perturbed results",
        perturbation_table(neg),
        "",
        "### Mirrored MR and other subjects",
        table(flips + others, False),
    ]
    missed = [r for r in neg if r.tre_mean >= 5.0 and not r.flagged]
    if missed:
        parts += ["", "Perturbations >= 5 mm not flagged:", table(missed, True)]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
