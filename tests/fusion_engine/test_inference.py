"""fuse(): shapes, determinism, strategies, precision paths, shipped weights and checksum."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_engine import onednn
from fusion_engine.defaults import DEFAULT_STRATEGY
from fusion_engine.errors import InputError, WeightsError
from fusion_engine.inference import (
    MODEL_RELEASE,
    MODEL_VERSION,
    STRATEGIES,
    WEIGHTS_DIR,
    fuse,
    load_model,
    load_state_dict,
    resolve_precision,
)


def _images(n: int = 3, h: int = 24, w: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    ring = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2).astype(np.float32)
    ct = np.stack([0.9 * ring * (1 - np.roll(ring, 2, 0)) + 0.05 * i for i in range(n)])
    mr = np.stack([0.6 * ring + 0.1 * rng.random((h, w)) for _ in range(n)])
    return ct.astype(np.float32).clip(0, 1), mr.astype(np.float32).clip(0, 1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def test_shapes_dtype_range() -> None:
    ct, mr = _images()
    out3 = fuse(ct, mr, device="cpu")
    out2 = fuse(ct[0], mr[0], device="cpu")
    assert out3.shape == ct.shape and out3.dtype == np.float32
    assert out2.shape == ct[0].shape
    assert float(out3.min()) >= 0.0 and float(out3.max()) <= 1.0
    assert np.allclose(out2, out3[0], atol=1e-5)


def test_deterministic_and_batch_independent() -> None:
    ct, mr = _images(4)
    a = fuse(ct, mr, device="cpu", batch_size=4)
    b = fuse(ct, mr, device="cpu", batch_size=4)
    c = fuse(ct, mr, device="cpu", batch_size=1)
    assert np.array_equal(a, b)
    assert np.allclose(a, c, atol=1e-5)


def test_all_strategies_run_and_differ() -> None:
    ct, mr = _images(1)
    outs = {s: fuse(ct, mr, strategy=s, device="cpu") for s in STRATEGIES}
    assert STRATEGIES[0] == DEFAULT_STRATEGY
    assert {"learned-fusion", "mean-attention", "mean-attention-paper"} <= set(outs)
    assert not np.allclose(outs["learned-fusion"], outs["mean-attention"])
    assert not np.allclose(outs["addition"], outs["average"])
    with pytest.raises(InputError):
        fuse(ct, mr, strategy="no-such")


def test_fused_lies_between_sources_on_structure() -> None:
    # a bright CT-only square and a bright MR-only square both survive fusion
    ct = np.zeros((32, 32), np.float32)
    mr = np.zeros((32, 32), np.float32)
    ct[4:12, 4:12] = 1.0
    mr[20:28, 20:28] = 0.8
    out = fuse(ct, mr, device="cpu")
    assert out[6:10, 6:10].mean() > out[0:3, 28:32].mean() + 0.2
    assert out[22:26, 22:26].mean() > out[0:3, 28:32].mean() + 0.2


@pytest.mark.parametrize("strategy", ["mean-attention", "l1-norm", "learned-fusion"])
def test_tiled_pass_equals_single_pass(strategy: str) -> None:
    rng = np.random.default_rng(1)
    ct = rng.random((2, 70, 90), dtype=np.float32)
    mr = rng.random((2, 70, 90), dtype=np.float32)
    whole = fuse(ct, mr, strategy=strategy, device="cpu", tile=0)
    tiled = fuse(ct, mr, strategy=strategy, device="cpu", tile=32)
    assert np.allclose(whole, tiled, atol=1e-5)
    with pytest.raises(InputError):
        fuse(ct, mr, tile=8)


@pytest.mark.parametrize("strategy", ["learned-fusion", "mean-attention"])
@pytest.mark.parametrize("precision", ["channels_last", "bf16"])
def test_fast_paths_within_45_db_of_fp32(precision: str, strategy: str) -> None:
    ct, mr = _images(2, 40, 40)
    ref = fuse(ct, mr, strategy=strategy, device="cpu", precision="fp32")
    fast = fuse(ct, mr, strategy=strategy, device="cpu", precision=precision)
    assert _psnr(fast, ref) >= 45.0


@pytest.mark.parametrize("native", [True, False])
def test_bf16_only_where_the_cpu_computes_it_natively(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Emulated bf16 is slower than fp32 and less exact: fall back to fp32 with a warning."""
    monkeypatch.setattr(onednn, "bf16_supported", lambda: native)
    with caplog.at_level(logging.WARNING, logger="fusion_engine.inference"):
        chosen = resolve_precision("bf16", torch.device("cpu"))
    assert chosen == ("bf16" if native else "channels_last")
    assert ("no native bf16" in caplog.text) is not native


@pytest.mark.parametrize(
    ("ct", "mr"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5))),  # shape mismatch
        (np.zeros(4), np.zeros(4)),  # 1-D
        (np.full((4, 4), 2.0), np.zeros((4, 4))),  # out of range
        (np.full((4, 4), np.nan), np.zeros((4, 4))),  # NaN
        (np.zeros((1, 1)), np.zeros((1, 1))),  # too small for reflect padding
    ],
)
def test_bad_inputs_raise_input_error(ct: np.ndarray, mr: np.ndarray) -> None:
    with pytest.raises(InputError):
        fuse(ct, mr, device="cpu")


def test_bad_arguments() -> None:
    ct, mr = _images(1)
    with pytest.raises(InputError):
        fuse(ct, mr, batch_size=0)
    with pytest.raises(InputError):
        fuse(ct, mr, precision="fp8")
    with pytest.raises(InputError):
        fuse(ct, mr, threads=0)


def test_shipped_weights_small_and_checksum_matches() -> None:
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    weights = WEIGHTS_DIR / manifest["file"]
    assert weights.stat().st_size < 1_000_000
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest == manifest["sha256"]
    assert re.fullmatch(r"res2net-fusion \d+\.\d+ \(sha256 [0-9a-f]{8}\)", MODEL_VERSION)
    assert digest[:8] in MODEL_VERSION
    assert MODEL_VERSION.startswith(f"res2net-fusion {MODEL_RELEASE} ")
    card = (WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    assert digest in card
    # both training stages are recorded; the paper's autoencoder is the one trained in stage 1
    assert set(manifest["stages"]) == {"autoencoder", "fusion"}
    assert manifest["stages"]["autoencoder"]["step"] > 0


def test_checksum_mismatch_raises(tmp_path: Path) -> None:
    shutil.copytree(WEIGHTS_DIR, tmp_path / "w")
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    path = tmp_path / "w" / manifest["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum"):
        load_state_dict(tmp_path / "w")
    with pytest.raises(WeightsError):
        load_model("cpu", "fp32", tmp_path / "w")


def test_missing_weights_raise(tmp_path: Path) -> None:
    with pytest.raises(WeightsError):
        load_state_dict(tmp_path)
    (tmp_path / "manifest.json").write_text('{"file": "x.pt", "sha256": "00"}')
    with pytest.raises(WeightsError, match="missing"):
        load_state_dict(tmp_path)


def test_import_is_lazy_and_free_of_dicom_stacks() -> None:
    code = (
        "import sys, fusion_engine\n"
        "assert 'torch' not in sys.modules, 'import fusion_engine loaded torch'\n"
        "import fusion_engine.inference, fusion_engine.research.train\n"
        "import fusion_engine.research.evaluate\n"
        "import fusion_engine.cli, fusion_engine.research.data\n"
        "fusion_engine.fuse, fusion_engine.STRATEGIES, fusion_engine.MODEL_VERSION\n"
        "bad = {'pydicom', 'pynetdicom', 'highdicom', 'sqlalchemy', 'dicom_node'}\n"
        "bad &= set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
