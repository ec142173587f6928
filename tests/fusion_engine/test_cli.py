"""The fusion-engine command: fuse, fuse-pairs, evaluate round trips on real PNG files."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion_engine.cli import main
from tests.fusion_engine.synthetic import make_pairs
from tests.peers import AANLIB


def _write_pair(tmp: Path, bits: int = 8, size: int = 48) -> tuple[Path, Path]:
    yy, xx = np.mgrid[0:size, 0:size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    ct = np.where(disk < (size / 3) ** 2, 0.3, 0.0) + np.where(disk < (size / 5) ** 2, 0.6, 0.0)
    mr = np.where(disk < (size / 2.5) ** 2, 0.5 + 0.2 * np.sin(xx / 3.0), 0.0)
    scale, dtype = (255, np.uint8) if bits == 8 else (65535, np.uint16)
    paths = []
    for name, img in (("ct.png", ct), ("mr.png", mr)):
        p = tmp / name
        Image.fromarray(np.rint(img.clip(0, 1) * scale).astype(dtype)).save(p)
        paths.append(p)
    return paths[0], paths[1]


def test_fuse_8bit_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct, mr = _write_pair(tmp_path, 8)
    out = tmp_path / "out" / "fused.png"
    assert main(["fuse", str(ct), str(mr), "-o", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (48, 48)
        arr = np.asarray(im)
    assert arr.max() > arr.min()
    assert "8-bit" in capsys.readouterr().out


def test_fuse_16bit_keeps_depth_and_strategy(tmp_path: Path) -> None:
    ct, mr = _write_pair(tmp_path, 16)
    out_a, out_b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["fuse", str(ct), str(mr), "-o", str(out_a)]) == 0
    assert main(["fuse", str(ct), str(mr), "-o", str(out_b), "--strategy", "addition"]) == 0
    with Image.open(out_a) as a, Image.open(out_b) as b:
        assert a.mode.startswith("I") and a.size == (48, 48)
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_fuse_size_mismatch_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct, _ = _write_pair(tmp_path, 8, 48)
    other = tmp_path / "small"
    other.mkdir()
    _, mr = _write_pair(other, 8, 32)
    assert main(["fuse", str(ct), str(mr), "-o", str(tmp_path / "x.png")]) == 2
    assert "differ" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_fuse_pairs(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "d", cases=("11", "12"), per_case=2) / "aanlib-ct-mri"
    out = tmp_path / "fused"
    assert main(["fuse-pairs", "--pairs", str(pairs), "--out", str(out), "--cases", "12"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["12000.png", "12001.png"]
    with Image.open(out / "12000.png") as im:
        assert im.mode == "L" and im.size == (48, 48)


def test_evaluate_report(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "d", cases=("11", "12"), per_case=2, size=64) / "aanlib-ct-mri"
    out = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--pairs",
                str(pairs),
                "--out",
                str(out),
                "--cases",
                "12",
                "--grid",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    for word in (
        "mean-attention-paper",
        "pixel-average",
        "laplacian-pyramid",
        "dwt",
        "Qabf",
        "VIFF",
        "p-values",
        "±",
    ):
        assert word in md
    rows = list(csv.reader((out / "summary.csv").open()))
    assert rows[0][0] == "metric" and [r[0] for r in rows[1:]] == [
        "AG",
        "SF",
        "EN",
        "MI",
        "PSNR",
        "SSIM",
        "Qabf",
        "VIFF",
        "air",
        "overshoot",
    ]
    # 7 network strategies and 4 classical baselines, 2 pairs; no peer folder beside the pairs
    assert len(list(csv.reader((out / "pairs.csv").open()))) == 1 + 11 * 2
    assert "learned-fusion" in md and "ifcnn-max" not in md
    with Image.open(out / "grid.png") as im:
        assert im.size[0] > im.size[1] > 100


def test_evaluate_scores_the_peers(tmp_path: Path) -> None:
    root = make_pairs(tmp_path / "d", cases=("11", "12"), per_case=2, size=64)
    pairs = root / "aanlib-ct-mri"
    for peer in ("ifcnn-max", "emfusion"):  # peer outputs: here the pixel maximum, raised
        (root / "peer-fusions" / peer).mkdir(parents=True)
        for name in ("12000", "12001"):
            ct = np.asarray(Image.open(pairs / "CT" / f"{name}.png"), dtype=np.uint8)
            mr = np.asarray(Image.open(pairs / "MRI" / f"{name}.png"), dtype=np.uint8)
            fused = np.maximum(ct, mr).clip(0, 200) + 40
            Image.fromarray(fused.astype(np.uint8)).save(
                root / "peer-fusions" / peer / f"{name}.png"
            )
    (root / "peer-fusions" / "emfusion" / "12001.png").unlink()  # incomplete: left out
    out = tmp_path / "report"
    args = ["evaluate", "--pairs", str(pairs), "--out", str(out), "--cases", "12", "--grid", "1"]
    assert main(args) == 0
    md = (out / "report.md").read_text()
    assert "ifcnn-max" in md and "emfusion" not in md
    rows = {(r[0], r[1]): r for r in csv.reader((out / "pairs.csv").open())}
    header = next(csv.reader((out / "pairs.csv").open()))
    air = header.index("air")
    assert float(rows[("12000", "ifcnn-max")][air]) == pytest.approx(40.0)  # raised background
    assert float(rows[("12000", "pixel-maximum")][air]) == 0.0
    assert main([*args, "--no-peers", "--out", str(tmp_path / "r2")]) == 0
    assert "ifcnn-max" not in (tmp_path / "r2" / "report.md").read_text()
    assert main([*args, "--peers", str(tmp_path / "none")]) == 2


def test_real_aanlib_pair(tmp_path: Path) -> None:
    if not (AANLIB / "CT").is_dir():
        pytest.skip(f"AANLIB pairs not present at {AANLIB}")
    name = sorted(p.name for p in (AANLIB / "CT").glob("*.png"))[0]
    out = tmp_path / "f.png"
    assert (
        main(["fuse", str(AANLIB / "CT" / name), str(AANLIB / "MRI" / name), "-o", str(out)]) == 0
    )
    ct = np.asarray(Image.open(AANLIB / "CT" / name).convert("L"), dtype=np.float64)
    mr = np.asarray(Image.open(AANLIB / "MRI" / name).convert("L"), dtype=np.float64)
    fused = np.asarray(Image.open(out), dtype=np.float64)
    # the fused image carries structure of both sources
    assert np.corrcoef(fused.ravel(), ct.ravel())[0, 1] > 0.3
    assert np.corrcoef(fused.ravel(), mr.ravel())[0, 1] > 0.3


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("fuse", "fuse-pairs", "evaluate", "train"):
        assert cmd in text
    # the console script is installed beside the interpreter (on PATH once the venv is active)
    bindir = str(Path(sys.executable).parent)
    assert shutil.which("fusion-engine") or shutil.which("fusion-engine", path=bindir)
