"""Stage 1, the paper's recipe: autoencoder training (extractor + reconstructor).

No fusion layer; loss (1 - SSIM) + MSE, Adam 1e-4, batch 4, 256 x 256 random crops with flips,
fixed seed, validation on held-out AANLIB cases. The loop, checkpoints and loss curves are
:mod:`fusion_engine.research.runs`; stage 2 (the learned fusion) is
:mod:`fusion_engine.research.fusion_train`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fusion_engine.defaults import DEFAULT_CT_WINDOW
from fusion_engine.model import FusionNet
from fusion_engine.research.data import (
    DEFAULT_VAL_CASES,
    TrainingSet,
    load_training_set,
    random_crop_batch,
)
from fusion_engine.research.losses import recon_loss, ssim_torch
from fusion_engine.research.runs import Schedule, Stage, pick_device, run, seed_everything

AUTOENCODER_PREFIXES = ("extractor.", "reconstructor.")
"""State-dict prefixes of the autoencoder (stage 1); the learned fusion stage is ``stage.``."""


@dataclass
class TrainConfig:
    """Settings of an autoencoder training run (saved in every checkpoint)."""

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


def autoencoder_state(model: FusionNet) -> dict[str, torch.Tensor]:
    """The stage-1 weights of ``model`` (extractor and reconstructor), detached."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.startswith(AUTOENCODER_PREFIXES)
    }


def validate(model: FusionNet, ts: TrainingSet, device: torch.device) -> dict[str, float]:
    """Reconstruction loss, SSIM and PSNR (dB, range 1) averaged over validation images."""
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
    if not losses:
        return {"val_loss": float("nan"), "val_ssim": float("nan"), "val_psnr": float("nan")}
    return {
        "val_loss": float(np.mean(losses)),
        "val_ssim": float(np.mean(ssims)),
        "val_psnr": float(np.mean(psnrs)),
    }


def _stage(cfg: TrainConfig, ts: TrainingSet, rng: np.random.Generator) -> Stage:
    device = pick_device(cfg.device)
    model = FusionNet().to(device)
    # channels_last is 2-3x faster for these small convolutions on CPU (and fine on CUDA)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for n, p in model.named_parameters() if n.startswith(AUTOENCODER_PREFIXES)]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def step() -> dict[str, float]:
        batch = torch.from_numpy(random_crop_batch(ts, cfg.batch_size, cfg.crop, rng))
        batch = batch.to(device).contiguous(memory_format=torch.channels_last)
        loss = recon_loss(model.autoencode(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        return {"loss": float(loss.detach())}

    return Stage(
        name="autoencoder: (1 - SSIM) + MSE",
        model=model,
        optimizer=opt,
        step=step,
        validate=lambda: validate(model, ts, device),
        state=lambda: autoencoder_state(model),
        images_per_step=cfg.batch_size,
        fields=("val_ssim", "val_psnr"),
        ylabel="(1 - SSIM) + MSE",
    )


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run (or resume) autoencoder training; returns the best validation figures."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = seed_everything(cfg.seed)
    ts = load_training_set(
        Path(cfg.data),
        val_cases=tuple(cfg.val_cases),
        use_phantom=cfg.use_phantom,
        ct_windows=tuple(tuple(w) for w in cfg.ct_windows),  # type: ignore[misc]
        max_phantom_slices=cfg.max_phantom_slices,
    )
    res = run(
        _stage(cfg, ts, rng),
        Schedule(cfg.steps, cfg.val_every, cfg.time_budget_s),
        Path(cfg.out),
        asdict(cfg),
        rng,
        resume=resume,
        description=ts.description,
        progress=progress,
    )
    best = res.best
    return TrainResult(
        res.steps,
        res.seconds,
        int(best["step"]),
        float(best["val_loss"]),
        float(best.get("val_ssim", float("nan"))),
        float(best.get("val_psnr", float("nan"))),
        res.out,
    )
