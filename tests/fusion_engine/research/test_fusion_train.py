"""Stage 2 (learned fusion) training: tiny runs on generated pairs from the shipped weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_engine.cli import main
from fusion_engine.inference import WEIGHTS_DIR, fuse, load_model, load_state_dict
from fusion_engine.model import LEARNED_STRATEGY
from fusion_engine.research.export import export_weights
from fusion_engine.research.fusion_train import FusionTrainConfig, split_cases, train_fusion
from fusion_engine.research.losses import FusionLossWeights
from tests.fusion_engine.synthetic import make_pairs


def _cfg(data: Path, out: Path, steps: int, seed: int = 0) -> FusionTrainConfig:
    return FusionTrainConfig(
        data=str(data),
        out=str(out),
        steps=steps,
        batch_size=2,
        crop=32,
        seed=seed,
        val_cases=("13",),
        val_every=2,
        loss=FusionLossWeights(),
        threads=1,
    )


def test_training_cases_exclude_validation_and_held_out(tmp_path: Path) -> None:
    root = make_pairs(tmp_path, cases=("2", "11", "12", "13"), per_case=1)
    pairs = root / "aanlib-ct-mri"
    assert split_cases(pairs, ("13",), ()) == {"2", "11", "12"}
    assert split_cases(pairs, ("13",), ("2",)) == {"11", "12"}
    with pytest.raises(ValueError):
        split_cases(pairs, ("2", "11"), ("12", "13"))


def test_tiny_run_trains_only_the_fusion_stage_and_resumes(tmp_path: Path) -> None:
    data = make_pairs(tmp_path / "data")
    out = tmp_path / "run"
    res = train_fusion(_cfg(data, out, 3), progress=False)
    assert res.steps == 3
    for name in ("last.pt", "best.pt", "loss.csv", "loss.png", "train.log"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 3]
    for key in ("gradient", "intensity", "ssim", "val_loss", "val_gradient"):
        assert float(rows[-1][key]) > 0.0, key
    assert "cases 11,12" in (out / "train.log").read_text()
    shipped = load_state_dict(WEIGHTS_DIR)
    state = torch.load(out / "last.pt", weights_only=False)["model"]
    frozen = [k for k in state if not k.startswith("stage.")]
    assert frozen and all(torch.equal(state[k], shipped[k]) for k in frozen)
    assert not torch.equal(state["stage.layer.gains.weight"], shipped["stage.layer.gains.weight"])
    res2 = train_fusion(_cfg(data, out, 5), resume=True, progress=False)
    assert res2.steps == 5
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 5]


def test_same_seed_same_weights(tmp_path: Path) -> None:
    data = make_pairs(tmp_path / "data")
    train_fusion(_cfg(data, tmp_path / "a", 2), progress=False)
    train_fusion(_cfg(data, tmp_path / "b", 2), progress=False)
    train_fusion(_cfg(data, tmp_path / "c", 2, seed=1), progress=False)
    wa, wb, wc = (torch.load(tmp_path / x / "last.pt", weights_only=False)["model"] for x in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["stage.layer.gains.weight"], wc["stage.layer.gains.weight"])


def test_export_and_use_the_trained_stage(tmp_path: Path) -> None:
    data = make_pairs(tmp_path / "data")
    train_fusion(_cfg(data, tmp_path / "run", 2), progress=False)
    dest = tmp_path / "w"
    digest = export_weights(tmp_path / "run" / "last.pt", dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["sha256"] == digest
    assert manifest["stages"]["fusion"]["step"] == 2
    assert manifest["stages"]["autoencoder"]["step"] > 0  # carried over from the init weights
    card = (dest / "MODEL_CARD.md").read_text()
    assert digest in card and "--stage fusion" in card
    assert (dest / manifest["file"]).stat().st_size < 1_000_000
    model = load_model("cpu", "fp32", dest)
    x = torch.rand(1, 1, 40, 40)
    with torch.inference_mode():
        out = model.run(x, x.flip(-1), LEARNED_STRATEGY)
    assert out.shape == x.shape and float(out.min()) >= 0.0


def test_cli_train_stage_fusion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_pairs(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--stage", "fusion", "--data", str(data), "--out", str(out)]
    args += ["--steps", "2", "--val-every", "1", "--crop", "32", "--batch-size", "2"]
    args += ["--val-cases", "13", "--seed", "3", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    assert "last validation fusion loss" in capsys.readouterr().out
    config = torch.load(out / "last.pt", weights_only=False)["config"]
    assert config["seed"] == 3 and config["loss"]["gradient"] == FusionLossWeights().gradient
    assert main(["export-weights", str(out / "last.pt"), "--dest", str(tmp_path / "w")]) == 0
    ct = np.zeros((32, 32), np.float32)
    ct[8:24, 8:24] = 0.9
    assert fuse(ct, ct, strategy=LEARNED_STRATEGY, device="cpu").shape == (32, 32)
