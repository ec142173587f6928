"""The ``fusion-engine`` command: fuse, fuse-pairs, evaluate, train, export-weights."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from fusion_engine.defaults import DEFAULT_CT_WINDOW, DEFAULT_STRATEGY
from fusion_engine.errors import FusionEngineError

log = logging.getLogger(__name__)


def _window(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("window must be CENTER,WIDTH (HU)")
    return float(parts[0]), float(parts[1])


def _cases(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fusion-engine``."""
    p = argparse.ArgumentParser(prog="fusion-engine", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    _add_fuse_commands(sub)
    _add_evaluate(sub)
    _add_train(sub)
    x = sub.add_parser(
        "export-weights", help="checkpoint of either stage -> fusion_engine/weights/"
    )
    x.add_argument("checkpoint", type=Path)
    x.add_argument("--dest", type=Path, default=Path(__file__).parent / "weights")
    return p


def _add_fuse_commands(sub: Subparsers) -> None:
    from fusion_engine.inference import STRATEGIES

    f = sub.add_parser("fuse", help="fuse one CT/MR pair of grey PNGs (8 or 16 bit)")
    f.add_argument("ct", type=Path)
    f.add_argument("mr", type=Path)
    f.add_argument("-o", "--output", type=Path, required=True)
    f.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES)
    f.add_argument("--device", default="auto")
    f.add_argument(
        "--bits",
        type=int,
        choices=(8, 16),
        default=None,
        help="output bit depth (default: that of the CT input)",
    )

    fp = sub.add_parser("fuse-pairs", help="fuse DIR/CT/*.png with DIR/MRI/*.png")
    fp.add_argument("--pairs", type=Path, required=True)
    fp.add_argument("--out", type=Path, required=True)
    fp.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES)
    fp.add_argument("--device", default="auto")
    fp.add_argument("--cases", type=_cases, default=None, help="only these cases, e.g. 21,34")


def _add_evaluate(sub: Subparsers) -> None:
    from fusion_engine.research.data import DEFAULT_VAL_CASES

    e = sub.add_parser("evaluate", help="Table-2 style report: strategies vs baselines")
    e.add_argument("--pairs", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument(
        "--cases",
        type=_cases,
        default=None,
        help="comma separated cases to evaluate (default: all pairs)",
    )
    e.add_argument(
        "--split",
        choices=("all", "val"),
        default="all",
        help=f"'val' = the validation cases {','.join(DEFAULT_VAL_CASES)}",
    )
    e.add_argument("--device", default="auto")
    e.add_argument("--grid", type=int, default=4, help="pairs shown in the PNG grids")
    e.add_argument(
        "--peers",
        type=Path,
        default=None,
        help="folder of peer outputs <peer>/<name>.png (default: PAIRS/../peer-fusions if present)",
    )
    e.add_argument("--no-peers", action="store_true", help="score without the peers")
    e.add_argument("--no-progress", action="store_true", help="no status lines")


def _add_train(sub: Subparsers) -> None:
    from fusion_engine.research.data import DEFAULT_VAL_CASES, default_data_root

    t = sub.add_parser(
        "train", help="train the autoencoder (paper recipe) or, --stage fusion, the fusion stage"
    )
    t.add_argument(
        "--stage",
        choices=("autoencoder", "fusion"),
        default="autoencoder",
        help="autoencoder: stage 1, the paper's recipe; fusion: stage 2, the learned fusion",
    )
    t.add_argument("--data", type=Path, default=default_data_root())
    t.add_argument("--out", type=Path, required=True, help="run directory")
    t.add_argument("--steps", type=int, default=None, help="default 4000 (stage 1), 1500 (2)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--crop", type=int, default=None, help="default 256 (stage 1), 128 (2)")
    t.add_argument("--lr", type=float, default=None, help="default 1e-4 (stage 1), 1e-3 (2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-cases", type=_cases, default=DEFAULT_VAL_CASES)
    t.add_argument("--val-every", type=int, default=None, help="default 100 (1), 250 (2)")
    _fusion_stage_arguments(t)
    t.add_argument("--no-phantom", action="store_true", help="AANLIB only")
    t.add_argument("--max-phantom-slices", type=int, default=None)
    t.add_argument(
        "--ct-window",
        type=_window,
        action="append",
        default=None,
        help="CT window(s) CENTER,WIDTH for phantom CT slices (repeatable)",
    )
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop (with checkpoints) after this many minutes of training",
    )
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--no-progress", action="store_true")


def _fusion_stage_arguments(t: argparse.ArgumentParser) -> None:
    """Options of ``train --stage fusion`` (the loss weights default to the shipped recipe)."""
    from fusion_engine.inference import WEIGHTS_DIR
    from fusion_engine.research.losses import FusionLossWeights

    w = FusionLossWeights()
    g = t.add_argument_group("fusion stage (--stage fusion)")
    g.add_argument("--init", type=Path, default=WEIGHTS_DIR, help="autoencoder weights folder")
    g.add_argument(
        "--exclude-cases", type=_cases, default=(), help="cases used neither to train nor validate"
    )
    g.add_argument("--loss-gradient", type=float, default=w.gradient)
    g.add_argument("--loss-intensity", type=float, default=w.intensity)
    g.add_argument("--loss-ssim", type=float, default=w.ssim)
    g.add_argument("--loss-gamma", type=float, default=w.gamma, help="saliency sharpness")
    g.add_argument(
        "--loss-ssim-equal",
        action="store_true",
        help="SSIM to both sources with equal weights (default: weighted by saliency)",
    )


def _cmd_fuse(args: argparse.Namespace) -> int:
    import numpy as np

    from fusion_engine.inference import fuse
    from fusion_engine.intensity import png_to_unit, unit_to_uint8, unit_to_uint16
    from fusion_engine.research.data import read_grey_png, write_grey_png

    ct_raw, mr_raw = read_grey_png(args.ct), read_grey_png(args.mr)
    if ct_raw.shape != mr_raw.shape:
        raise FusionEngineError(f"CT {ct_raw.shape} and MR {mr_raw.shape} differ in size")
    fused = fuse(
        png_to_unit(ct_raw), png_to_unit(mr_raw), strategy=args.strategy, device=args.device
    )
    bits = args.bits or (16 if ct_raw.dtype == np.uint16 else 8)
    out = unit_to_uint16(fused) if bits == 16 else unit_to_uint8(fused)
    write_grey_png(args.output, out)
    print(f"wrote {args.output} ({bits}-bit, strategy {args.strategy})")
    return 0


def _cmd_fuse_pairs(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.progress import Progress

    from fusion_engine.inference import fuse
    from fusion_engine.intensity import unit_to_uint8
    from fusion_engine.research.data import list_pairs, read_unit_png, write_grey_png

    pairs = list_pairs(args.pairs, set(args.cases) if args.cases else None)
    if not pairs:
        raise FusionEngineError(f"no matching CT/MRI pairs in {args.pairs}")
    args.out.mkdir(parents=True, exist_ok=True)
    with Progress() as bar:
        task = bar.add_task("fusing", total=len(pairs))
        for p in pairs:
            ct, mr = read_unit_png(p.ct), read_unit_png(p.mr)
            if ct.shape != mr.shape:
                raise FusionEngineError(f"{p.name}: CT {ct.shape} and MR {mr.shape} differ")
            fused = fuse(ct, mr, strategy=args.strategy, device=args.device)
            write_grey_png(args.out / f"{p.name}.png", unit_to_uint8(np.asarray(fused)))
            bar.advance(task)
    print(f"wrote {len(pairs)} fused images to {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fusion_engine.research.data import DEFAULT_VAL_CASES
    from fusion_engine.research.evaluate import evaluate

    cases = args.cases
    if cases is None and args.split == "val":
        cases = DEFAULT_VAL_CASES
    peers = args.peers or args.pairs.resolve().parent / "peer-fusions"
    if args.no_peers or not peers.is_dir():
        if args.peers is not None and not args.no_peers:
            raise FusionEngineError(f"peer folder {args.peers} not found")
        peers = None
    report = evaluate(
        args.pairs, args.out, cases=cases, device=args.device, grid_pairs=args.grid, peers_dir=peers
    )
    print(report.markdown)
    print(f"report written to {args.out}")
    return 0


STAGE_OPTIONS = ("steps", "crop", "lr", "val_every")
"""Options whose defaults differ between the stages: left out when not given, so that each
stage's config class (``TrainConfig``, ``FusionTrainConfig``) supplies its own default."""


def _stage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stage-dependent options the user gave."""
    return {k: getattr(args, k) for k in STAGE_OPTIONS if getattr(args, k) is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    if args.stage == "fusion":
        return _cmd_train_fusion(args)
    from fusion_engine.research.train import TrainConfig, train

    windows = tuple(args.ct_window) if args.ct_window else (DEFAULT_CT_WINDOW,)
    cfg = TrainConfig(
        data=str(args.data),
        out=str(args.out),
        batch_size=args.batch_size,
        seed=args.seed,
        val_cases=tuple(args.val_cases),
        use_phantom=not args.no_phantom,
        ct_windows=windows,
        max_phantom_slices=args.max_phantom_slices,
        device=args.device,
        threads=args.threads,
        time_budget_s=None if args.time_budget_min is None else args.time_budget_min * 60.0,
        **_stage_options(args),
    )
    res = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(
        f"steps {res.steps} in {res.seconds:.0f} s; best step {res.best_step}: val loss "
        f"{res.best_val_loss:.4f}, SSIM {res.best_val_ssim:.4f}, PSNR {res.best_val_psnr:.2f} dB"
    )
    return 0


def _cmd_train_fusion(args: argparse.Namespace) -> int:
    from fusion_engine.research.fusion_train import FusionTrainConfig, train_fusion
    from fusion_engine.research.losses import FusionLossWeights

    cfg = FusionTrainConfig(
        data=str(args.data),
        out=str(args.out),
        init=str(args.init),
        batch_size=args.batch_size,
        seed=args.seed,
        val_cases=tuple(args.val_cases),
        exclude_cases=tuple(args.exclude_cases),
        loss=FusionLossWeights(
            args.loss_gradient,
            args.loss_intensity,
            args.loss_ssim,
            args.loss_gamma,
            ssim_by_saliency=not args.loss_ssim_equal,
        ),
        device=args.device,
        threads=args.threads,
        time_budget_s=None if args.time_budget_min is None else args.time_budget_min * 60.0,
        **_stage_options(args),
    )
    res = train_fusion(cfg, resume=args.resume, progress=not args.no_progress)
    print(
        f"steps {res.steps} in {res.seconds:.0f} s; last validation fusion loss "
        f"{_last_val(Path(res.out)):.4f}; weights in {res.out}/last.pt"
    )
    return 0


def _last_val(run_dir: Path) -> float:
    import csv

    rows = list(csv.DictReader((run_dir / "loss.csv").open()))
    return float(rows[-1]["val_loss"]) if rows else float("nan")


def _cmd_export(args: argparse.Namespace) -> int:
    from fusion_engine.research.export import export_weights

    digest = export_weights(args.checkpoint, args.dest)
    print(f"exported {args.checkpoint} -> {args.dest} sha256 {digest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fusion-engine``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handlers = {
        "fuse": _cmd_fuse,
        "fuse-pairs": _cmd_fuse_pairs,
        "evaluate": _cmd_evaluate,
        "train": _cmd_train,
        "export-weights": _cmd_export,
    }
    try:
        return handlers[args.command](args)
    except FusionEngineError as exc:
        print(f"fusion-engine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
