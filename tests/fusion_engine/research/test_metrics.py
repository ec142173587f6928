"""Tests of fusion_engine.research.metrics: golden values and hand-checkable cases."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from fusion_engine.errors import InputError
from fusion_engine.research import metrics
from tests.peers import SHARED_DATA, require_full_data

GOLDEN = SHARED_DATA / "metric-golden"

Triple = tuple[str, str, npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]


def _load(path: Path) -> npt.NDArray[np.float64]:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


@pytest.fixture(scope="module")
def golden() -> list[tuple[Triple, dict[str, float]]]:
    """(method, image, A, B, F) with the expected metric values, for every row of values.csv."""
    root = require_full_data(GOLDEN)
    rows: list[tuple[Triple, dict[str, float]]] = []
    with open(root / "values.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            name, method = row["image"], row["method"]
            triple: Triple = (
                method,
                name,
                _load(root / "pairs" / "CT" / name),
                _load(root / "pairs" / "MRI" / name),
                _load(root / "fused" / method / name),
            )
            rows.append((triple, {k: float(row[k]) for k in metrics.METRIC_NAMES}))
    if len(rows) != 24:
        pytest.fail(f"expected 24 rows in {root / 'values.csv'}, found {len(rows)}")
    return rows


def test_metric_names_match_golden_columns() -> None:
    assert metrics.METRIC_NAMES == ("AG", "SF", "EN", "MI", "PSNR", "SSIM", "Qabf", "VIFF")


@pytest.mark.fulldata
@pytest.mark.parametrize("name", metrics.METRIC_NAMES)
def test_golden_values(name: str, golden: list[tuple[Triple, dict[str, float]]]) -> None:
    """Every metric matches values.csv to a relative 1e-6 on all 24 fused images."""
    fn = {
        "AG": lambda a, b, f: metrics.ag(f),
        "SF": lambda a, b, f: metrics.sf(f),
        "EN": lambda a, b, f: metrics.en(f),
        "MI": metrics.mi,
        "PSNR": metrics.psnr,
        "SSIM": metrics.ssim,
        "Qabf": metrics.q_abf,
        "VIFF": metrics.viff,
    }[name]
    bad = []
    for (method, image, a, b, f), expected in golden:
        got = fn(a, b, f)
        if not math.isclose(got, expected[name], rel_tol=1e-6, abs_tol=0.0):
            bad.append(f"{method}/{image}: got {got!r}, expected {expected[name]!r}")
    assert not bad, "\n".join(bad)


@pytest.mark.fulldata
def test_all_metrics_matches_golden(golden: list[tuple[Triple, dict[str, float]]]) -> None:
    (_, _, a, b, f), expected = golden[0]
    got = metrics.all_metrics(a, b, f)
    assert list(got) == list(metrics.METRIC_NAMES)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6)


# --------------------------------------------------------------------------- hand-checked


def _two_level() -> npt.NDArray[np.float64]:
    """4x4 image: left two columns 0, right two columns 10."""
    img = np.zeros((4, 4))
    img[:, 2:] = 10.0
    return img


def test_constant_image_has_no_gradient_and_no_entropy() -> None:
    f = np.full((32, 32), 77.0)
    assert metrics.ag(f) == 0.0
    assert metrics.sf(f) == 0.0
    assert metrics.en(f) == 0.0


def test_two_level_image_by_hand() -> None:
    f = _two_level()
    # Half the pixels at each of two levels: exactly one bit.
    assert metrics.en(f) == pytest.approx(1.0, abs=1e-15)
    # AG on the 3x3 forward-difference grid: only column j=1 has a step (dx=10, dy=0),
    # contributing sqrt(100/2) three times out of nine cells.
    assert metrics.ag(f) == pytest.approx(3.0 * math.sqrt(50.0) / 9.0, rel=1e-12)
    # SF: row differences 4 rows x 3, one step of 10 per row -> RF^2 = 400/12; CF = 0.
    assert metrics.sf(f) == pytest.approx(math.sqrt(400.0 / 12.0), rel=1e-12)
    assert metrics.sf(f.T) == pytest.approx(metrics.sf(f), rel=1e-12)


def test_psnr_by_hand_and_identical() -> None:
    a = np.zeros((8, 8))
    b = np.full((8, 8), 20.0)
    f = np.full((8, 8), 10.0)
    # MSE(A,F) = MSE(B,F) = 100.
    assert metrics.psnr(a, b, f) == pytest.approx(10.0 * math.log10(255.0**2 / 100.0))
    assert metrics.psnr(a, a, a) == math.inf


def _textured(seed: int = 1, shape: tuple[int, int] = (64, 64)) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = 120 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 10, shape)
    return np.asarray(np.clip(np.rint(img), 0, 255), dtype=np.float64)


def test_identical_images() -> None:
    a = _textured()
    assert metrics.ssim_pair(a, a) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(a, a, a) == pytest.approx(1.0, abs=1e-12)
    # MI(A,A) is the entropy of A, so MI of F=A=B is twice it.
    assert metrics.mutual_information(a, a) == pytest.approx(metrics.en(a), rel=1e-12)
    assert metrics.mi(a, a, a) == pytest.approx(2.0 * metrics.en(a), rel=1e-12)
    # Perfect edge transfer: strength ratio 1 and orientation term 1 everywhere gives the
    # product of the two sigmoids at 1, i.e. the maximum Q_abf (slightly below 1 by definition).
    q_max = (0.9994 / (1 + math.exp(-15 * 0.5))) * (0.9879 / (1 + math.exp(-22 * 0.2)))
    assert metrics.q_abf(a, a, a) == pytest.approx(q_max, rel=1e-12)
    # VIFF: gain 1, no distortion noise -> information ratio 1 at every weighted scale.
    assert metrics.viff(a, a, a) == pytest.approx(1.0, abs=1e-6)


def test_fused_worse_than_source_scores_lower() -> None:
    a = _textured(1)
    b = _textured(2)
    blurred = (a + np.roll(a, 1, 0) + np.roll(a, 1, 1) + np.roll(a, 1, (0, 1))) / 4.0
    assert metrics.q_abf(a, a, blurred) < metrics.q_abf(a, a, a)
    assert metrics.viff(a, a, blurred) < metrics.viff(a, a, a)
    assert metrics.ssim(a, a, blurred) < 1.0
    # Symmetric in the two sources.
    f = (a + b) / 2.0
    assert metrics.q_abf(a, b, f) == pytest.approx(metrics.q_abf(b, a, f), rel=1e-12)
    assert metrics.viff(a, b, f) == pytest.approx(metrics.viff(b, a, f), rel=1e-12)


def test_q_abf_without_edges_is_zero() -> None:
    # All-zero images: no Sobel response anywhere (a non-zero constant has edges at the border,
    # because the Sobel filter uses zero padding), so the weight sum is 0 and Q_abf is 0.
    c = np.zeros((16, 16))
    assert metrics.q_abf(c, c, c) == 0.0


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: metrics.mi(x, x, y),
        lambda x, y: metrics.psnr(x, y, x),
        lambda x, y: metrics.ssim(y, x, x),
        lambda x, y: metrics.q_abf(x, x, y),
        lambda x, y: metrics.viff(x, y, y),
        lambda x, y: metrics.all_metrics(x, x, y),
        metrics.ssim_pair,
        metrics.mutual_information,
    ],
)
def test_shape_mismatch_raises(call: object) -> None:
    x = np.zeros((64, 64))
    y = np.zeros((64, 63))
    with pytest.raises(InputError, match="shape"):
        call(x, y)  # type: ignore[operator]


def test_bad_inputs_raise() -> None:
    with pytest.raises(InputError, match="2-D"):
        metrics.ag(np.zeros((4, 4, 3)))
    with pytest.raises(InputError, match="2-D"):
        metrics.en(np.zeros(16))
    with pytest.raises(InputError, match="NaN"):
        metrics.sf(np.full((4, 4), np.nan))
    with pytest.raises(InputError, match=r"0\.\.255"):
        metrics.en(np.full((4, 4), 300.0))
    with pytest.raises(InputError):
        metrics.ag("not an image")
    small = np.zeros((40, 40))
    with pytest.raises(InputError, match="41x41"):
        metrics.viff(small, small, small)
    with pytest.raises(InputError, match="window"):
        metrics.ssim_pair(np.zeros((10, 10)), np.zeros((10, 10)))
