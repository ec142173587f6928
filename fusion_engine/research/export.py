"""Export of trained weights: fp32 state dict, ``manifest.json`` and ``MODEL_CARD.md``.

One weights file holds both training stages (the paper's autoencoder and the learned fusion
stage), so one sha256 names the whole model (``fusion_engine.inference.MODEL_VERSION``). The
manifest keeps, per stage, the step, validation figures, configuration and training facts
(time, steps, data) the model card is written from.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fusion_engine.defaults import LEARNED_STRATEGY
from fusion_engine.model import FusionNet, conv_macs, count_parameters, fusion_macs_per_pixel

WEIGHTS_FILE = "res2net_fusion.pt"


def run_facts(run_dir: Path, step: int) -> dict[str, Any]:
    """Training time at ``step``, total steps and time, and the data lines of a run folder."""
    facts: dict[str, Any] = {"seconds_at_step": None, "steps_run": None, "seconds_total": None}
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
    lines = log.read_text().splitlines() if log.is_file() else []
    facts["data"] = list(dict.fromkeys(ln[6:].strip() for ln in lines if ln.startswith("data: ")))
    return facts


def stage_record(checkpoint: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The manifest entry of one training stage from its checkpoint and run folder."""
    step = int(checkpoint.get("step", 0))
    return {
        "step": step,
        "validation": checkpoint.get("val", {}),
        "config": checkpoint.get("config", {}),
        "training": run_facts(run_dir, step),
    }


def _minutes(x: Any) -> str:
    return "n/a" if x is None else f"{float(x) / 60:.0f}"


def _autoencoder_section(rec: dict[str, Any]) -> str:
    cfg, val, facts = rec.get("config", {}), rec.get("validation", {}), rec.get("training", {})
    windows = " ".join(f"--ct-window {c:g},{w:g}" for c, w in cfg.get("ct_windows", []))
    budget = cfg.get("time_budget_s")
    command = (
        f"fusion-engine train --data {cfg.get('data')} --out {cfg.get('out')} "
        f"--steps {cfg.get('steps')} --val-every {cfg.get('val_every')} "
        + (f"--time-budget-min {float(budget) / 60:g} " if budget else "")
        + windows
    ).strip()
    data = "\n".join(f"  - {d}" for d in facts.get("data") or ["(see the run's train.log)"])
    step = rec.get("step")
    return f"""## Stage 1: autoencoder (`fusion-engine train`, the paper's recipe)
- Command: `{command}`
- Recipe: extractor + reconstructor, no fusion layer, loss (1 - SSIM) + MSE (SSIM: Gaussian
  11x11, sigma 1.5), Adam lr {float(cfg.get("lr", 1e-4)):g}, batch {cfg.get("batch_size")},
  {cfg.get("crop")}x{cfg.get("crop")} random crops with random flips, seed {cfg.get("seed")}.
- Data:
{data}
- Validation: every AANLIB image (CT and MR separately) of the held-out cases
  {", ".join(cfg.get("val_cases", []))}, whole images; split by case, never by slice.
- Steps: {facts.get("steps_run") or step} run; these weights are the best validation
  checkpoint, step {step}.
- Training time: {_minutes(facts.get("seconds_at_step"))} min to step {step}
  ({_minutes(facts.get("seconds_total"))} min in all) on a shared 2-core CPU (AVX-512).
- Validation reconstruction at step {step}: SSIM {float(val.get("val_ssim", "nan")):.4f}, PSNR
  {float(val.get("val_psnr", "nan")):.2f} dB (range [0, 1], output clamped).
"""


def _fusion_section(rec: dict[str, Any] | None) -> str:
    if not rec:
        return """## Stage 2: learned fusion stage
Not trained for these weights: `learned-fusion` holds its initial state (gains 1, the
autoencoder's reconstructor). Train it with `fusion-engine train --stage fusion`.
"""
    cfg, val, facts = rec.get("config", {}), rec.get("validation", {}), rec.get("training", {})
    loss = cfg.get("loss", {})
    ssim_weights = "weighted by saliency" if loss.get("ssim_by_saliency") else "equal weights"
    data = "\n".join(f"  - {d}" for d in facts.get("data") or ["(see the run's train.log)"])
    step = rec.get("step")
    return f"""## Stage 2: learned fusion stage (`fusion-engine train --stage fusion`)
- Command: `fusion-engine train --stage fusion --data {cfg.get("data")} --out {cfg.get("out")}
  --steps {cfg.get("steps")} --seed {cfg.get("seed")}`
- Trained: the fusion layer and a copy of the reconstructor; the extractor is frozen.
- Loss (no ground truth, `fusion_engine.research.losses`): {loss.get("gradient")} x gradient
  toward the stronger source's Sobel gradient + {loss.get("intensity")} x L1 to the
  saliency-weighted intensity target (gamma {loss.get("gamma")}) + {loss.get("ssim")} x
  (1 - SSIM to both sources, {ssim_weights}).
- Optimiser: Adam lr {float(cfg.get("lr", 0)):g}, batch {cfg.get("batch_size")},
  {cfg.get("crop")}x{cfg.get("crop")} crops with the same random flips for both sources,
  seed {cfg.get("seed")}.
- Data:
{data}
- Steps: {facts.get("steps_run") or step}; these weights are the last step, {step} (the
  validation loss was logged, not used to choose).
- Training time: {_minutes(facts.get("seconds_total"))} min on a shared 2-core CPU (AVX-512).
- Validation fusion loss at step {step}: {float(val.get("val_loss", "nan")):.4f}.
"""


def model_card(version: str, manifest: dict[str, Any], size_kb: float) -> str:
    """The text of ``MODEL_CARD.md``."""
    net = FusionNet()
    stages = manifest.get("stages", {})
    macs = fusion_macs_per_pixel(net, LEARNED_STRATEGY)
    base = fusion_macs_per_pixel(net, "mean-attention")
    return f"""# Model card: {version}

Weights `{manifest["file"]}` (fp32 state dict, {size_kb:.0f} kB), sha256
`{manifest["sha256"]}`
(checked by `fusion_engine.inference.load_state_dict` before every load; a mismatch raises
`WeightsError`). Loaded from the package, never from the network.

## Model
Res2Net-based MR-CT fusion network after Chen et al. (2024), Table 1: extractor Conv3 1->32,
Conv3 32->64, Res2Net block (Conv1 64->64, 4 groups of 16 channels, y1 = x1, yi = Hi(xi + y(i-1)),
each Hi two Conv3 16->16, concatenation, Conv1 64->64, identity shortcut); reconstructor Conv3
64->64->32->16->1; reflect padding; ReLU after every convolution except the last;
{count_parameters(net.extractor) + count_parameters(net.reconstructor)} parameters. The
hand-made fusion rules (`mean-attention`, `mean-attention-paper`, ...) have no weights.

Learned fusion stage (`learned-fusion`): fusion layer Conv1 128->32, Conv3 32->32, Conv1
32->128 giving a gain in (0, 2) per pixel, channel and source ({conv_macs(net.stage.layer)}
multiply-adds per pixel), and its own fine-tuned reconstructor;
{count_parameters(net.stage)} parameters. A whole fusion costs {macs} multiply-adds per pixel
against {base} with a hand-made rule (+{100 * (macs / base - 1):.1f} %).

{_autoencoder_section(stages.get("autoencoder", {}))}
{_fusion_section(stages.get("fusion"))}
## Intended use
Research and development of CT-MR image fusion for radiotherapy contouring support: a fused
display image computed from a planning CT and a rigidly registered MR, with values in [0, 1].
The inputs must be prepared as in `fusion_engine.intensity` (CT window, MR percentile scaling).

## Limits
- Not a medical device; not validated clinically. The fused image is a visual aid and must not
  replace the CT for dose calculation or the MR for diagnosis.
- Trained on a few hundred 2-D slices: AANLIB brain pairs (already windowed 8-bit PNGs) and,
  for the autoencoder, one porcine head phantom (CT and T2 MR). The fusion stage saw only the
  AANLIB pairs of the training cases. Other anatomy, contrasts, noise levels and pathology are
  outside the training data.
- The fusion quality depends on the registration: misregistered inputs give doubled edges.
- The validation cases chose the autoencoder's checkpoint; the fusion stage's loss weights were
  chosen on training cases held out for that purpose, and its checkpoint is the last step.
"""


def write_weights(state: dict[str, torch.Tensor], dest_dir: Path, stages: dict[str, Any]) -> str:
    """Write ``state`` (validated against :class:`FusionNet`), its manifest and model card.

    Returns the sha256 of the weights file.
    """
    from fusion_engine.inference import MODEL_NAME, MODEL_RELEASE

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    FusionNet().load_state_dict(state)  # every key and shape
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / WEIGHTS_FILE
    torch.save(state, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    manifest = {"file": WEIGHTS_FILE, "sha256": digest, "stages": stages}
    (dest_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    version = f"{MODEL_NAME} {MODEL_RELEASE} (sha256 {digest[:8]})"
    card = model_card(version, manifest, target.stat().st_size / 1024)
    (dest_dir / "MODEL_CARD.md").write_text(card)
    return digest


def export_weights(checkpoint: Path, dest_dir: Path) -> str:
    """Export a checkpoint of either stage into ``dest_dir``; returns the weights' sha256.

    A stage-1 (autoencoder) checkpoint gets an untrained fusion stage (gains 1 and a copy of
    the reconstructor): the fusion stage depends on the extractor's features and must be
    trained again after a new autoencoder. A stage-2 checkpoint holds the whole network; its
    autoencoder record comes from the manifest of the weights it started from.
    """
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state: dict[str, torch.Tensor] = ck["model"]
    record = stage_record(ck, checkpoint.parent)
    if any(k.startswith("stage.") for k in state):
        init = Path(str(ck.get("config", {}).get("init", dest_dir)))
        previous = json.loads((init / "manifest.json").read_text())
        stages = {"autoencoder": previous["stages"]["autoencoder"], "fusion": record}
    else:
        net = FusionNet()
        net.load_state_dict(state, strict=False)
        net.stage.reconstructor.load_state_dict(net.reconstructor.state_dict())
        state = net.state_dict()
        stages = {"autoencoder": record, "fusion": None}
    return write_weights(state, dest_dir, stages)
