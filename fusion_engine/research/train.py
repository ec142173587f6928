"""Autoencoder training (the paper's recipe) and export of the shipped weights.

Extractor + reconstructor without the fusion layer, loss (1 - SSIM) + MSE, Adam 1e-4,
batch 4, 256 x 256 random crops with flips, fixed seed, validation on held-out AANLIB cases.
Writes into the run directory: ``last.pt`` (resumable), ``best.pt`` (best validation loss),
``loss.csv``, ``loss.png``, ``train.log``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fusion_engine.defaults import DEFAULT_CT_WINDOW
from fusion_engine.model import FusionNet, count_parameters
from fusion_engine.research.data import (
    DEFAULT_VAL_CASES,
    TrainingSet,
    load_training_set,
    random_crop_batch,
)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_torch(x: Tensor, y: Tensor, window: Tensor | None = None) -> Tensor:
    """Mean SSIM (Wang et al. 2004; Gaussian 11x11, sigma 1.5, data range 1) of (N,1,H,W)."""
    w = _gaussian_window().to(x) if window is None else window
    c1, c2 = 0.01**2, 0.03**2
    mx = F.conv2d(x, w)
    my = F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx * mx
    syy = F.conv2d(y * y, w) - my * my
    sxy = F.conv2d(x * y, w) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean()


def recon_loss(out: Tensor, target: Tensor) -> Tensor:
    """The paper's loss: (1 - SSIM) + MSE."""
    return (1.0 - ssim_torch(out, target)) + F.mse_loss(out, target)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class TrainConfig:
    """Settings of a training run (saved in every checkpoint)."""

    data: str
    out: str
    steps: int = 4000
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-4
    seed: int = 0
    val_cases: tuple[str, ...] = DEFAULT_VAL_CASES
    val_every: int = 100
    use_phantom: bool = True
    ct_windows: tuple[tuple[float, float], ...] = (DEFAULT_CT_WINDOW,)
    max_phantom_slices: int | None = None
    device: str = "auto"
    threads: int | None = None
    time_budget_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Summary of a finished (or time-limited) run."""

    steps: int
    seconds: float
    best_step: int
    best_val_loss: float
    best_val_ssim: float
    best_val_psnr: float
    out: str


@torch.no_grad()
def validate(model: FusionNet, ts: TrainingSet, device: torch.device) -> dict[str, float]:
    """Reconstruction loss, SSIM and PSNR (dB, range 1) averaged over validation images."""
    model.eval()
    losses, ssims, psnrs = [], [], []
    for img in ts.val_images:
        x = torch.from_numpy(img)[None, None].to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        out = model.autoencode(x).clamp(0.0, 1.0)
        s = float(ssim_torch(out, x))
        mse = float(F.mse_loss(out, x))
        losses.append(1.0 - s + mse)
        ssims.append(s)
        psnrs.append(10.0 * math.log10(1.0 / max(mse, 1e-12)))
    model.train()
    if not losses:
        return {"val_loss": float("nan"), "val_ssim": float("nan"), "val_psnr": float("nan")}
    return {
        "val_loss": float(np.mean(losses)),
        "val_ssim": float(np.mean(ssims)),
        "val_psnr": float(np.mean(psnrs)),
    }


def _plot_curve(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, train, vsteps, val = [], [], [], []
    with csv_path.open() as fh:
        for row in csv.DictReader(fh):
            steps.append(int(row["step"]))
            train.append(float(row["train_loss"]))
            if row["val_loss"]:
                vsteps.append(int(row["step"]))
                val.append(float(row["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, train, label="train (1-SSIM)+MSE", lw=1)
    if val:
        ax.plot(vsteps, val, "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


CSV_FIELDS = ["step", "train_loss", "val_loss", "val_ssim", "val_psnr", "elapsed_s", "img_per_s"]


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run (or resume) autoencoder training; returns the best validation figures."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    random.seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    ts = load_training_set(
        Path(cfg.data),
        val_cases=tuple(cfg.val_cases),
        use_phantom=cfg.use_phantom,
        ct_windows=tuple(tuple(w) for w in cfg.ct_windows),  # type: ignore[misc]
        max_phantom_slices=cfg.max_phantom_slices,
    )
    model = FusionNet().to(device)
    # channels_last is 2-3x faster for these small convolutions on CPU (and fine on CUDA)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    elapsed_before = 0.0
    best = {"step": 0, "val_loss": float("inf"), "val_ssim": float("nan"), "val_psnr": float("nan")}
    csv_path = out / "loss.csv"
    last = out / "last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        elapsed_before = float(ck["elapsed_s"])
        best = ck["best"]
        np_rng.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
    else:
        with csv_path.open("w", newline="") as fh:
            csv.writer(fh).writerow(CSV_FIELDS)
    log = (out / "train.log").open("a")
    log.write(
        f"start step={step} device={device} threads={torch.get_num_threads()} "
        f"params={count_parameters(model)} config={json.dumps(asdict(cfg))}\n"
        + "".join(f"data: {d}\n" for d in ts.description)
    )
    log.flush()

    def save_last() -> None:
        tmp = last.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "elapsed_s": elapsed_before + (time.monotonic() - t0),
                "best": best,
                "np_rng": np_rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "config": asdict(cfg),
            },
            tmp,
        )
        tmp.replace(last)

    t0 = time.monotonic()
    model.train()
    running: list[float] = []
    t_last = time.monotonic()
    imgs_since = 0
    with Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]}  {task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task(
            "train", total=cfg.steps, completed=step, loss=float("nan"), val="-", speed=""
        )
        while step < cfg.steps:
            batch = torch.from_numpy(random_crop_batch(ts, cfg.batch_size, cfg.crop, np_rng))
            batch = batch.to(device).contiguous(memory_format=torch.channels_last)
            out_img = model.autoencode(batch)
            loss = recon_loss(out_img, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            imgs_since += cfg.batch_size
            running.append(loss.item())
            now = time.monotonic()
            speed = imgs_since / max(now - t_last, 1e-9)
            bar.update(
                task, completed=step, loss=float(np.mean(running[-20:])), speed=f"{speed:.2f} img/s"
            )
            over_time = (
                cfg.time_budget_s is not None and elapsed_before + (now - t0) >= cfg.time_budget_s
            )
            if step % cfg.val_every == 0 or step == cfg.steps or over_time:
                v = validate(model, ts, device)
                row = [
                    step,
                    float(np.mean(running)),
                    v["val_loss"],
                    v["val_ssim"],
                    v["val_psnr"],
                    elapsed_before + (now - t0),
                    speed,
                ]
                with csv_path.open("a", newline="") as fh:
                    csv.writer(fh).writerow(row)
                if v["val_loss"] < best["val_loss"]:
                    best = {"step": step, **v}
                    torch.save(
                        {
                            "model": model.state_dict(),
                            "step": step,
                            "val": v,
                            "config": asdict(cfg),
                        },
                        out / "best.pt",
                    )
                save_last()
                _plot_curve(csv_path, out / "loss.png")
                log.write(
                    f"step {step} train {np.mean(running):.5f} val {v} "
                    f"elapsed {elapsed_before + now - t0:.0f}s {speed:.2f} img/s\n"
                )
                log.flush()
                bar.update(task, val=f"{v['val_loss']:.4f} ssim {v['val_ssim']:.3f}")
                running = []
                t_last = time.monotonic()
                imgs_since = 0
            if over_time:
                log.write(f"time budget reached at step {step}\n")
                break
    seconds = elapsed_before + (time.monotonic() - t0)
    log.write(f"done step={step} seconds={seconds:.0f} best={best}\n")
    log.close()
    return TrainResult(
        step,
        seconds,
        int(best["step"]),
        float(best["val_loss"]),
        float(best["val_ssim"]),
        float(best["val_psnr"]),
        str(out),
    )


def _run_facts(run_dir: Path, step: int) -> dict[str, Any]:
    """Training time at ``step``, total steps/time and data lines from a run directory."""
    facts: dict[str, Any] = {
        "seconds_at_step": None,
        "data": [],
        "steps_run": None,
        "seconds_total": None,
    }
    csv_path = run_dir / "loss.csv"
    if csv_path.is_file():
        rows = list(csv.DictReader(csv_path.open()))
        for row in rows:
            if int(row["step"]) == step:
                facts["seconds_at_step"] = float(row["elapsed_s"])
        if rows:
            facts["steps_run"] = int(rows[-1]["step"])
            facts["seconds_total"] = float(rows[-1]["elapsed_s"])
    log = run_dir / "train.log"
    if log.is_file():
        lines = [ln[6:].strip() for ln in log.read_text().splitlines() if ln.startswith("data: ")]
        facts["data"] = list(dict.fromkeys(lines))
    return facts


MODEL_CARD_TEMPLATE = """# Model card: {version}

Weights `{file}` (fp32 state dict, {size_kb:.0f} kB), sha256
`{sha256}`
(checked by `fusion_engine.inference.load_state_dict` before every load; a mismatch raises
`WeightsError`). Loaded from the package, never from the network.

## Model
Res2Net-based MR-CT fusion network after Chen et al. (2024), Table 1: extractor Conv3 1->32,
Conv3 32->64, Res2Net block (Conv1 64->64, 4 groups of 16 channels, y1 = x1, yi = Hi(xi + y(i-1)),
each Hi two Conv3 16->16, concatenation, Conv1 64->64, identity shortcut); reconstructor Conv3
64->64->32->16->1; reflect padding; ReLU after every convolution except the last;
{params} parameters. The fusion layer has no weights (strategies in `fusion_engine.model`).

## Training (`fusion-engine train`)
- Command: `{command}`
- Recipe (paper): autoencoder (extractor + reconstructor, no fusion layer), loss (1 - SSIM) + MSE
  (SSIM: Gaussian 11x11, sigma 1.5), Adam lr {lr:g}, batch {batch}, {crop}x{crop} random crops with
  random horizontal and vertical flips, seed {seed}.
- Data:
{data}
- Validation: every AANLIB image (CT and MR separately) of the held-out cases
  {val_cases}, whole 256x256 images; split by case, never by slice.
- Steps: {steps_run} run; these weights are the best validation checkpoint, step {step}.
- Training time: {minutes_at_step} min to step {step} ({minutes_total} min in all) on
  {device_desc}.
- Validation reconstruction at step {step}: SSIM {val_ssim:.4f}, PSNR {val_psnr:.2f} dB
  (range [0, 1], output clamped), loss {val_loss:.4f}.

## Intended use
Research and development of CT-MR image fusion for radiotherapy contouring support: a fused
display image computed from a planning CT and a rigidly registered MR, with values in [0, 1].
The inputs must be prepared as in `fusion_engine.intensity` (CT window, MR percentile scaling).

## Limits
- Not a medical device; not validated clinically. The fused image is a visual aid and must not
  replace the CT for dose calculation or the MR for diagnosis.
- Trained on a few hundred 2-D slices: AANLIB brain pairs (already windowed 8-bit PNGs) and
  one porcine head phantom (CT and T2 MR). Other anatomy, contrasts, noise levels and pathology
  are outside the training data.
- The fusion quality depends on the registration: misregistered inputs give doubled edges.
- The validation cases were also used to choose the checkpoint and to evaluate the fusion
  strategies; there was no separate test set.
"""


def write_model_card(
    dest_dir: Path,
    manifest: dict[str, Any],
    run_dir: Path | None,
    device_desc: str = "a shared 2-core CPU (AVX-512)",
) -> Path:
    """Write ``MODEL_CARD.md`` next to the weights from the manifest and the run directory."""
    from fusion_engine.inference import MODEL_NAME, MODEL_RELEASE

    cfg = manifest.get("config", {})
    val = manifest.get("validation", {})
    step = int(manifest.get("step", 0))
    facts = _run_facts(run_dir, step) if run_dir is not None else {}

    def minutes(x: Any) -> str:
        return "n/a" if x is None else f"{float(x) / 60:.0f}"

    windows = " ".join(f"--ct-window {c:g},{w:g}" for c, w in cfg.get("ct_windows", []))
    command = (
        f"fusion-engine train --data {cfg.get('data')} --out {cfg.get('out')} "
        f"--steps {cfg.get('steps')} --val-every {cfg.get('val_every')} "
        + (
            f"--time-budget-min {float(cfg['time_budget_s']) / 60:g} "
            if cfg.get("time_budget_s")
            else ""
        )
        + windows
    )
    data_lines = facts.get("data") or ["(see the run's train.log)"]
    text = MODEL_CARD_TEMPLATE.format(
        version=f"{MODEL_NAME} {MODEL_RELEASE} (sha256 {manifest['sha256'][:8]})",
        file=manifest["file"],
        size_kb=(dest_dir / str(manifest["file"])).stat().st_size / 1024,
        sha256=manifest["sha256"],
        params=count_parameters(FusionNet()),
        command=command.strip(),
        lr=float(cfg.get("lr", 1e-4)),
        batch=cfg.get("batch_size"),
        crop=cfg.get("crop"),
        seed=cfg.get("seed"),
        data="\n".join(f"  - {d}" for d in data_lines),
        val_cases=", ".join(cfg.get("val_cases", [])),
        steps_run=facts.get("steps_run") or step,
        step=step,
        minutes_at_step=minutes(facts.get("seconds_at_step")),
        minutes_total=minutes(facts.get("seconds_total")),
        device_desc=device_desc,
        val_ssim=float(val.get("val_ssim", float("nan"))),
        val_psnr=float(val.get("val_psnr", float("nan"))),
        val_loss=float(val.get("val_loss", float("nan"))),
    )
    path = dest_dir / "MODEL_CARD.md"
    path.write_text(text)
    return path


def export_weights(checkpoint: Path, dest_dir: Path, name: str = "res2net_fusion.pt") -> str:
    """Write a checkpoint's model as fp32 weights plus ``manifest.json`` and ``MODEL_CARD.md``.

    Returns the sha256 of the written weights file.
    """
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in ck["model"].items()}
    FusionNet().load_state_dict(state)  # validates the keys and shapes
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / name
    torch.save(state, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    manifest = {
        "file": name,
        "sha256": digest,
        "step": int(ck.get("step", 0)),
        "validation": ck.get("val", {}),
        "config": ck.get("config", {}),
    }
    (dest_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    write_model_card(dest_dir, manifest, checkpoint.parent)
    return digest
