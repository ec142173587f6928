"""Stage 1 (autoencoder) training: tiny runs on generated PNG pairs, split by case, resume,
export."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_engine.inference import load_state_dict
from fusion_engine.research.export import export_weights
from fusion_engine.research.train import AUTOENCODER_PREFIXES, TrainConfig, train
from tests.fusion_engine.synthetic import make_pairs
from tests.peers import FIXTURES, MRIDIR


def _cfg(data: Path, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        out=str(out),
        steps=steps,
        batch_size=2,
        crop=32,
        val_cases=("13",),
        val_every=2,
        use_phantom=False,
        threads=1,
    )


def test_tiny_run_writes_outputs_and_resumes(tmp_path: Path) -> None:
    data = make_pairs(tmp_path / "data")
    out = tmp_path / "run"
    res = train(_cfg(data, out, 3), progress=False)
    assert res.steps == 3
    for name in ("last.pt", "best.pt", "loss.csv", "loss.png", "train.log"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 3]
    assert 0.0 < float(rows[-1]["val_ssim"]) <= 1.0
    res2 = train(_cfg(data, out, 5), resume=True, progress=False)
    assert res2.steps == 5
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 5]
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 5


def test_same_seed_same_weights(tmp_path: Path) -> None:
    data = make_pairs(tmp_path / "data")
    train(_cfg(data, tmp_path / "a", 2), progress=False)
    train(_cfg(data, tmp_path / "b", 2), progress=False)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_export_weights_manifest(tmp_path: Path) -> None:
    data = make_pairs(tmp_path / "data")
    train(_cfg(data, tmp_path / "run", 2), progress=False)
    digest = export_weights(tmp_path / "run" / "best.pt", tmp_path / "w")
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["sha256"] == digest
    assert hashlib.sha256((tmp_path / "w" / manifest["file"]).read_bytes()).hexdigest() == digest
    state = load_state_dict(tmp_path / "w")
    assert all(v.dtype == torch.float32 for v in state.values())
    card = (tmp_path / "w" / "MODEL_CARD.md").read_text()
    assert digest in card and "Not trained for these weights" in card
    # stage 1 trains and saves only the autoencoder; export gives the fusion stage its
    # initial state: a copy of the reconstructor
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    assert saved and all(k.startswith(AUTOENCODER_PREFIXES) for k in saved)
    assert manifest["stages"]["fusion"] is None
    assert manifest["stages"]["autoencoder"]["step"] == 2
    for k in ("conv1.weight", "conv4.bias"):
        assert torch.equal(state[f"stage.reconstructor.{k}"], state[f"reconstructor.{k}"])


def test_dicom_series_reader_on_phantom() -> None:
    from fusion_engine.research.data import read_dicom_series

    ct_dir = FIXTURES / "mridir_small" / "ct"
    if not any(ct_dir.glob("*.dcm")):
        ct_dir = MRIDIR / "ct"
    if not any(ct_dir.glob("*.dcm")):
        pytest.skip("no MRI-DIR CT series (fixture or ../shared/data) present")
    vol = read_dicom_series(ct_dir)
    assert vol.ndim == 3 and vol.dtype == np.float32
    assert float(vol.min()) < -500 and float(vol.max()) > 200  # HU: air and bone
