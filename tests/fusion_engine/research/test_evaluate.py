"""evaluate(): every method scored, peers read from their folder, files and grids written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fusion_engine.errors import InputError
from fusion_engine.research.evaluate import evaluate, read_peers
from tests.fusion_engine.synthetic import make_pairs


def _max_fuse(ct: np.ndarray, mr: np.ndarray, **_: Any) -> np.ndarray:
    """A stand-in for the network: the pixel maximum (fast, and its scores are known)."""
    out: np.ndarray = np.maximum(ct, mr)
    return out


def test_scores_strategies_baselines_and_peers(tmp_path: Path) -> None:
    root = make_pairs(tmp_path, cases=("11", "12"), per_case=2, size=64)
    pairs = root / "aanlib-ct-mri"
    peer_dir = root / "peer-fusions" / "u2fusion"
    peer_dir.mkdir(parents=True)
    for name in ("12000", "12001"):
        grey = np.full((64, 64), 19, np.uint8)  # a raised background and nothing else
        Image.fromarray(grey).save(peer_dir / f"{name}.png")
    report = evaluate(
        pairs,
        tmp_path / "out",
        cases=["12"],
        strategies=["learned-fusion", "mean-attention"],
        default="learned-fusion",
        grid_pairs=2,
        peers_dir=root / "peer-fusions",
        fuse_fn=_max_fuse,
    )
    assert report.methods[0] == "learned-fusion"
    assert report.groups["u2fusion"] == "peer" and report.groups["dwt"] == "baseline"
    assert report.names == ["12000", "12001"]
    # the stand-in equals the pixel maximum, so both score alike
    for metric in ("Qabf", "VIFF", "EN", "SSIM"):
        assert report.mean("learned-fusion", metric) == pytest.approx(
            report.mean("pixel-maximum", metric)
        )
    assert report.mean("u2fusion", "air") == pytest.approx(19.0)
    checks = report.target_checks()
    assert checks["air stays black: mean grey level of the air <= 1"]
    names = {p.name for p in report.files}
    assert names == {"report.md", "summary.csv", "pairs.csv", "grid.png"}  # 64 px: no zoom
    assert "u2fusion" in (tmp_path / "out" / "report.md").read_text()


def test_peer_of_another_size_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "ifcnn-max"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "11000.png")
    with pytest.raises(InputError):
        read_peers(tmp_path, ["11000"], (64, 64))
    assert read_peers(tmp_path, ["11001"], (64, 64)) == {}  # missing file: peer left out


def test_unknown_default_and_empty_cases(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path, cases=("11",), per_case=1) / "aanlib-ct-mri"
    with pytest.raises(InputError):
        evaluate(pairs, tmp_path / "o", strategies=["average"], default="learned-fusion")
    with pytest.raises(InputError):
        evaluate(pairs, tmp_path / "o", cases=["99"], fuse_fn=_max_fuse)
