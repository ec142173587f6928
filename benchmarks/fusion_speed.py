"""Fusion throughput against this machine's fp32 GEMM rate.

Usage: ``python benchmarks/fusion_speed.py [--threads N] [--batch 2] [--slices 8] [--size 512]
[--strategies learned-fusion,mean-attention]``

1. torch fp32 matrix multiply 2048 x 2048 (same thread count): GFLOP/s = 2 n^3 / t, measured
   once at the start and again just before every timed run (a shared virtual machine's rate
   drifts by tens of percent within minutes): the "x GEMM" column is the median over the runs
   of each run's rate divided by the GEMM rate measured just before it; "GEMM" is the median
   of those GEMM rates.
2. ``fusion_engine`` fusion of size x size slices with the shipped weights, for each strategy
   named (default: the learned fusion stage and the hand-made ``mean-attention``) and each
   precision path (fp32 NCHW, channels_last fp32, bf16 channels_last where the CPU supports
   it): ms per slice and effective GFLOP/s = 2 x multiply-adds of (two extractors + the
   fusion layer's convolutions, if any + one reconstructor) x pixels / time, and the ratio of
   that to the GEMM rate.
   PSNR of each path against fp32 is printed too (a fast path must stay >= 45 dB from fp32).

The slices are the AANLIB validation pairs (``--data``, default ../shared/data) upsampled to
size x size, so that the PSNR reflects real anatomy; without that data, smoothed random images
(a PSNR on noise says little: near-ties between the sources flip under any rounding).

Timings are medians of repeated runs after warm-up, inside
:func:`fusion_engine.allocator.reuse_freed_memory` as :func:`fusion_engine.volume.fuse_volume`
runs them (freed activations are reused, not page-faulted in again for every layer).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from machine import cpu_flags

from fusion_engine.allocator import reuse_freed_memory
from fusion_engine.inference import LoadedModel, bf16_native, fuse, load_model
from fusion_engine.model import LEARNED_STRATEGY, fusion_macs_per_pixel
from fusion_engine.research.data import (
    DEFAULT_VAL_CASES,
    default_data_root,
    list_pairs,
    read_unit_png,
)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """fp32 matrix-multiply rate of torch in GFLOP/s."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    t = median_time(lambda: torch.mm(a, b, out=c), repeats)
    return 2.0 * n**3 / t / 1e9


def timed_round(run: Callable[[], object], device: str) -> tuple[float, float]:
    """One timed run of ``run`` (seconds) paired with a GEMM rate measured just before it."""
    rate = gemm_gflops(repeats=5, device=device)
    t = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, rate


def test_slices(data: Path, count: int, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``count`` CT and MR slices of size x size: real pairs when present, else smooth noise."""
    pairs_dir = data / "aanlib-ct-mri"
    if pairs_dir.is_dir():
        pairs = list_pairs(pairs_dir, set(DEFAULT_VAL_CASES))[:count]
        if len(pairs) == count:

            def up(path: Path) -> torch.Tensor:
                img = torch.from_numpy(read_unit_png(path))[None, None]
                big = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear")
                return big[0, 0]

            ct = torch.stack([up(p.ct) for p in pairs]).clamp(0, 1).numpy()
            mr = torch.stack([up(p.mr) for p in pairs]).clamp(0, 1).numpy()
            return ct, mr, f"{count} AANLIB validation pairs upsampled to {size}x{size}"
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2 * count, 1, size, size, generator=g)
    smooth = torch.nn.functional.avg_pool2d(noise, 9, 1, 4)[:, 0].numpy()
    return smooth[:count], smooth[count:], f"smoothed random images ({pairs_dir} not found)"


def main() -> None:
    """Run the benchmark and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch", type=int, default=2, help="slices per forward pass")
    p.add_argument("--slices", type=int, default=8, help="slices per timed run")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=256, help="tile size of the tiled paths")
    p.add_argument("--data", type=Path, default=default_data_root(), help="shared data folder")
    p.add_argument(
        "--strategies",
        default=f"{LEARNED_STRATEGY},mean-attention",
        help="comma separated strategies to time",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    flags = cpu_flags()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {threads}, device {device}"
    )
    print(
        "CPU flags:",
        ", ".join(sorted(f for f in flags if f.startswith(("avx", "amx")))) or "none",
        f"| native bf16: {'yes' if bf16_native(device) else 'no (bf16 not timed)'}",
    )

    gemm = gemm_gflops(device=args.device)
    print(f"fp32 GEMM 2048x2048: {gemm:.1f} GFLOP/s")

    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    net = load_model("cpu", "fp32").net
    macs = {st: fusion_macs_per_pixel(net, st) for st in strategies}
    for st, m in macs.items():
        print(
            f"network, {st}: {m} multiply-adds per pixel "
            f"({m / fusion_macs_per_pixel(net, 'mean-attention'):.3f} x a hand-made rule) "
            f"= {2.0 * m * args.size**2 / 1e9:.2f} GFLOP per {args.size}x{args.size} slice"
        )

    ct, mr, source = test_slices(args.data, args.slices, args.size)
    print(f"slices: {source}")
    for st in strategies:
        time_paths(args, st, 2.0 * macs[st] * args.size**2, ct, mr)


def time_paths(
    args: argparse.Namespace, strategy: str, flop_per_slice: float, ct: np.ndarray, mr: np.ndarray
) -> None:
    """Time every precision path of ``strategy`` and print one table row per path."""
    device = torch.device(args.device)
    # (label, precision, tile): tile None = one pass over the whole slice
    paths: list[tuple[str, str, int | None]] = [
        ("fp32", "fp32", None),
        ("channels_last", "channels_last", None),
        (f"channels_last t{args.tile}", "channels_last", args.tile),
    ]
    if bf16_native(device):
        paths += [("bf16", "bf16", None), (f"bf16 t{args.tile}", "bf16", args.tile)]
    ref = fuse(
        ct,
        mr,
        strategy=strategy,
        device=args.device,
        precision="fp32",
        batch_size=args.batch,
        tile=0,
    )
    print()
    print(f"strategy {strategy}")
    print(
        f"{'path':<20}{'ms/slice':>10}{'GFLOP/s':>10}{'GEMM':>8}{'x GEMM':>8}{'PSNR vs fp32':>14}"
    )
    for label, prec, tile in paths:
        model = load_model(args.device, prec)
        ta = torch.from_numpy(ct)[:, None]
        tb = torch.from_numpy(mr)[:, None]

        def run(
            model: LoadedModel = model,
            ta: torch.Tensor = ta,
            tb: torch.Tensor = tb,
            tile: int | None = tile,
        ) -> None:
            with torch.inference_mode():
                for s in range(0, args.slices, args.batch):
                    model.run(ta[s : s + args.batch], tb[s : s + args.batch], strategy, tile)

        with reuse_freed_memory():  # as fuse_volume: steady state after the first batch
            run()
            rounds = [timed_round(run, args.device) for _ in range(args.repeats)]
        per_slice = statistics.median(t for t, _ in rounds) / args.slices
        gflops = flop_per_slice / per_slice / 1e9
        ratio = statistics.median(flop_per_slice * args.slices / t / 1e9 / g for t, g in rounds)
        ref_rate = statistics.median(g for _, g in rounds)
        out = fuse(
            ct,
            mr,
            strategy=strategy,
            device=args.device,
            precision=prec,
            batch_size=args.batch,
            tile=tile or 0,
        )
        mse = float(np.mean((out.astype(np.float64) - ref) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
        print(
            f"{label:<20}{per_slice * 1e3:>10.1f}{gflops:>10.1f}{ref_rate:>8.1f}"
            f"{ratio:>8.2f}"
            f"{psnr:>12.1f} dB"
        )


if __name__ == "__main__":
    main()
