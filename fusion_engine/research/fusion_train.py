"""Stage 2: train the learned fusion stage (fusion layer + fine-tuned reconstructor).

Starts from trained autoencoder weights (by default the shipped ones): the extractor stays
frozen, so every hand-made rule and the paper's exact rule keep their network; the fusion
stage's reconstructor starts as a copy of the autoencoder's and is fine-tuned together with
the new :class:`~fusion_engine.model.FusionLayer`. Trained without ground truth on the
registered CT/MR pairs of the training cases (never the validation cases) with the fusion
loss of :mod:`fusion_engine.research.losses`; 128 x 128 random crops of the 256 x 256 AANLIB
images (the fusion is local: the network sees 13 pixels around a pixel; smaller crops made
steps four times cheaper on the shared CPU) with the same random flips for both sources; Adam;
fixed seed. The shipped weights are the last step
(the validation loss is logged for the curves, it does not choose the checkpoint).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fusion_engine.inference import WEIGHTS_DIR, load_state_dict
from fusion_engine.model import FusionNet
from fusion_engine.research.data import (
    DEFAULT_VAL_CASES,
    PairSet,
    list_pairs,
    load_pair_set,
    random_pair_crops,
)
from fusion_engine.research.losses import FusionLossWeights, fusion_loss
from fusion_engine.research.runs import (
    RunResult,
    Schedule,
    Stage,
    pick_device,
    run,
    seed_everything,
)
from fusion_engine.research.train import AUTOENCODER_PREFIXES

STAGE_PREFIX = "stage."
"""State-dict prefix of the learned fusion stage."""

LOSS_TERMS = ("gradient", "intensity", "ssim")


@dataclass
class FusionTrainConfig:
    """Settings of a fusion-stage training run (saved in every checkpoint)."""

    data: str
    out: str
    init: str = str(WEIGHTS_DIR)
    steps: int = 1500
    batch_size: int = 4
    crop: int = 128
    lr: float = 1e-3
    seed: int = 0
    val_cases: tuple[str, ...] = DEFAULT_VAL_CASES
    exclude_cases: tuple[str, ...] = ()
    val_every: int = 250
    loss: FusionLossWeights = field(default_factory=FusionLossWeights)
    device: str = "auto"
    threads: int | None = None
    time_budget_s: float | None = None


def split_cases(pairs_dir: Path, val: tuple[str, ...], exclude: tuple[str, ...]) -> set[str]:
    """The training cases: every case of ``pairs_dir`` except validation and excluded ones."""
    cases = {p.case for p in list_pairs(pairs_dir)} - set(val) - set(exclude)
    if not cases:
        raise ValueError(f"no training cases left in {pairs_dir}")
    return cases


def init_model(init: Path, device: torch.device) -> FusionNet:
    """A network with the autoencoder of ``init`` (a weights folder with a manifest) and a
    fresh fusion stage whose reconstructor is a copy of the autoencoder's."""
    model = FusionNet()
    state = load_state_dict(init)
    auto = {k: v for k, v in state.items() if k.startswith(AUTOENCODER_PREFIXES)}
    model.load_state_dict(auto, strict=False)
    model.stage.reconstructor.load_state_dict(model.reconstructor.state_dict())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(STAGE_PREFIX))
    model = model.to(device)
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def _to(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return t.contiguous(memory_format=torch.channels_last)


def fuse_learned(model: FusionNet, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Forward pass of the learned stage; the frozen extractor runs without gradients."""
    n = a.shape[0]
    with torch.no_grad():
        feats = model.extractor(torch.cat([a, b], dim=0))
    out: torch.Tensor = model.stage.reconstructor(model.stage.layer(feats[:n], feats[n:]))
    return out


def validate(
    model: FusionNet, val: PairSet, weights: FusionLossWeights, device: torch.device
) -> dict[str, float]:
    """Fusion loss and its terms over the validation pairs (whole images, output clamped)."""
    sums = dict.fromkeys(("val_loss", *(f"val_{k}" for k in LOSS_TERMS)), 0.0)
    for i in range(len(val)):
        a, b = _to(val.ct[i : i + 1, None], device), _to(val.mr[i : i + 1, None], device)
        total, terms = fusion_loss(a, b, fuse_learned(model, a, b).clamp(0, 1), weights)
        sums["val_loss"] += float(total)
        for k in LOSS_TERMS:
            sums[f"val_{k}"] += terms[k]
    return {k: v / max(len(val), 1) for k, v in sums.items()}


def _stage(
    cfg: FusionTrainConfig, train_set: PairSet, val_set: PairSet, rng: np.random.Generator
) -> Stage:
    device = pick_device(cfg.device)
    model = init_model(Path(cfg.init), device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)

    def step() -> dict[str, float]:
        ct, mr = random_pair_crops(train_set, cfg.batch_size, cfg.crop, rng)
        a, b = _to(ct, device), _to(mr, device)
        loss, terms = fusion_loss(a, b, fuse_learned(model, a, b), cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        return {"loss": float(loss.detach()), **terms}

    def state() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return Stage(
        name="fusion stage: fusion loss",
        model=model,
        optimizer=opt,
        step=step,
        validate=lambda: validate(model, val_set, cfg.loss, device),
        state=state,
        images_per_step=cfg.batch_size,
        fields=(*LOSS_TERMS, *(f"val_{k}" for k in LOSS_TERMS)),
        ylabel="fusion loss",
    )


def train_fusion(
    cfg: FusionTrainConfig, *, resume: bool = False, progress: bool = True
) -> RunResult:
    """Run (or resume) fusion-stage training; the run directory as in stage 1."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = seed_everything(cfg.seed)
    pairs_dir = Path(cfg.data) / "aanlib-ct-mri"
    train_cases = split_cases(pairs_dir, cfg.val_cases, cfg.exclude_cases)
    train_set = load_pair_set(pairs_dir, train_cases)
    val_set = load_pair_set(pairs_dir, set(cfg.val_cases))
    description = [
        f"AANLIB pairs: {len(train_set)} training pairs (cases "
        f"{','.join(sorted(train_cases, key=int))}), {len(val_set)} validation pairs "
        f"(cases {','.join(cfg.val_cases)})"
        + (f"; cases {','.join(cfg.exclude_cases)} left out" if cfg.exclude_cases else "")
    ]
    return run(
        _stage(cfg, train_set, val_set, rng),
        Schedule(cfg.steps, cfg.val_every, cfg.time_budget_s),
        Path(cfg.out),
        asdict(cfg),
        rng,
        resume=resume,
        description=description,
        progress=progress,
    )
