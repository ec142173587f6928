"""Export: run facts from a run folder, the manifest of both stages, the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusion_engine.inference import WEIGHTS_DIR, load_state_dict
from fusion_engine.research.export import run_facts, write_weights


def test_run_facts_from_csv_and_log(tmp_path: Path) -> None:
    (tmp_path / "loss.csv").write_text("step,elapsed_s\n50,100.0\n100,230.5\n")
    (tmp_path / "train.log").write_text("start\ndata: AANLIB pairs: 3\ndata: AANLIB pairs: 3\n")
    facts = run_facts(tmp_path, 50)
    assert facts == {
        "seconds_at_step": 100.0,
        "steps_run": 100,
        "seconds_total": 230.5,
        "data": ["AANLIB pairs: 3"],
    }
    assert run_facts(tmp_path / "none", 1)["steps_run"] is None


def test_write_weights_checks_the_state_and_writes_the_card(tmp_path: Path) -> None:
    state = load_state_dict(WEIGHTS_DIR)
    stages = json.loads((WEIGHTS_DIR / "manifest.json").read_text())["stages"]
    digest = write_weights(state, tmp_path, stages)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sha256"] == digest and manifest["stages"] == stages
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert digest[:8] in card.splitlines()[0]
    assert "Stage 1: autoencoder" in card and "Stage 2: learned fusion stage" in card
    assert "+12.3 %" in card  # the learned stage's extra multiply-adds
    broken = dict(state)
    broken.pop("stage.layer.gains.bias")
    with pytest.raises(RuntimeError):
        write_weights(broken, tmp_path / "bad", stages)
    assert not (tmp_path / "bad" / "manifest.json").exists()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
