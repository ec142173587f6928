"""Training loop: tiny runs on generated PNG pairs, split by case, resume, export."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_engine.inference import load_state_dict
from fusion_engine.research.data import list_pairs, load_training_set, random_crop_batch
from fusion_engine.research.train import TrainConfig, export_weights, recon_loss, ssim_torch, train
from tests.peers import MRIDIR


def make_pairs(
    root: Path, cases: tuple[str, ...] = ("11", "12", "13"), per_case: int = 2, size: int = 48
) -> Path:
    """AANLIB-like tree root/aanlib-ct-mri/{CT,MRI}/CCSSS.png of synthetic head-like images."""
    rng = np.random.default_rng(42)
    base = root / "aanlib-ct-mri"
    for sub in ("CT", "MRI"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in cases:
        for s in range(per_case):
            r = size / 3 + s
            disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
            ct = np.where(disk < r**2, 60, 0) + np.where(abs(np.sqrt(disk) - r) < 2, 190, 0)
            mr = np.where(disk < (r - 2) ** 2, 120 + 60 * rng.random((size, size)), 0)
            Image.fromarray(ct.clip(0, 255).astype(np.uint8)).save(base / "CT" / f"{c}{s:03d}.png")
            Image.fromarray(mr.clip(0, 255).astype(np.uint8)).save(base / "MRI" / f"{c}{s:03d}.png")
    return root


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


def test_split_is_by_case(tmp_path: Path) -> None:
    root = make_pairs(tmp_path)
    ts = load_training_set(root, val_cases=("13",), use_phantom=False)
    assert len(ts.images) == 8 and len(ts.val_images) == 4
    assert all(n.startswith("13") for n in ts.val_names)
    assert {p.case for p in list_pairs(root / "aanlib-ct-mri")} == {"11", "12", "13"}


def test_random_crops_shape_and_seed(tmp_path: Path) -> None:
    ts = load_training_set(make_pairs(tmp_path), val_cases=("13",), use_phantom=False)
    a = random_crop_batch(ts, 3, 32, np.random.default_rng(5))
    b = random_crop_batch(ts, 3, 32, np.random.default_rng(5))
    big = random_crop_batch(ts, 1, 64, np.random.default_rng(5))  # larger than the images
    assert a.shape == (3, 1, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert big.shape == (1, 1, 64, 64)


def test_loss_is_zero_for_identical_images() -> None:
    x = torch.rand(2, 1, 24, 24)
    assert float(ssim_torch(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(recon_loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(recon_loss(x, 1 - x)) > 0.5


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
    assert digest in (tmp_path / "w" / "MODEL_CARD.md").read_text()


def test_dicom_series_reader_on_phantom() -> None:
    from fusion_engine.research.data import read_dicom_series

    ct_dir = Path(__file__).resolve().parents[1] / "fixtures" / "mridir_small" / "ct"
    if not any(ct_dir.glob("*.dcm")):
        ct_dir = MRIDIR / "ct"
    if not any(ct_dir.glob("*.dcm")):
        pytest.skip("no MRI-DIR CT series (fixture or ../shared/data) present")
    vol = read_dicom_series(ct_dir)
    assert vol.ndim == 3 and vol.dtype == np.float32
    assert float(vol.min()) < -500 and float(vol.max()) > 200  # HU: air and bone
