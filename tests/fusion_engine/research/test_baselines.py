"""Tests of fusion_engine.research.baselines: golden reference fusions and by construction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from fusion_engine.errors import InputError
from fusion_engine.research import baselines, metrics
from tests.peers import SHARED_DATA, require_full_data

GOLDEN = SHARED_DATA / "metric-golden"
NAMES = ("16010", "20012", "21008", "28010", "32012", "34015")

Image3 = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


def _load(path: Path) -> npt.NDArray[np.float64]:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


@pytest.fixture(scope="module")
def pairs() -> dict[str, Image3]:
    """The six CT/MR golden pairs as float64 0..255."""
    root = require_full_data(GOLDEN)
    return {
        n: (_load(root / "pairs" / "CT" / f"{n}.png"), _load(root / "pairs" / "MRI" / f"{n}.png"))
        for n in NAMES
    }


@pytest.mark.fulldata
@pytest.mark.parametrize("method", baselines.BASELINES)
def test_matches_reference_fusions(method: str, pairs: dict[str, Image3]) -> None:
    """Defaults reproduce fused/<method>/*.png (currently pixel for pixel for all four).

    average/max must match exactly; laplacian/dwt are allowed a 1-level rounding difference on
    a few pixels (a value within an ulp of .5 could round either way on another platform).
    """
    for n, (a, b) in pairs.items():
        ref = _load(GOLDEN / "fused" / method / f"{n}.png")
        got = baselines.to_uint8(baselines.fuse_baseline(method, a, b)).astype(np.float64)
        diff = np.abs(got - ref)
        if method in ("average", "max"):
            assert diff.max() == 0.0, f"{method}/{n}"
        else:
            assert diff.max() <= 1.0, f"{method}/{n}: max diff {diff.max()}"
            assert np.mean(diff == 0) >= 0.999, f"{method}/{n}"
            mse = float(np.mean(diff**2))
            assert mse == 0.0 or 10 * math.log10(255.0**2 / mse) > 60.0, f"{method}/{n}"


@pytest.mark.fulldata
def test_metric_ordering_is_plausible(pairs: dict[str, Image3]) -> None:
    """Multi-scale fusions are sharper and transfer more edges than the average; the average
    stays closest to both sources (highest PSNR); max keeps more edges than the average."""
    for n, (a, b) in pairs.items():
        fused = {m: baselines.fuse_baseline(m, a, b) for m in baselines.BASELINES}
        f8 = {m: baselines.to_uint8(f).astype(np.float64) for m, f in fused.items()}
        ag = {m: metrics.ag(f) for m, f in f8.items()}
        qabf = {m: metrics.q_abf(a, b, f) for m, f in f8.items()}
        psnr = {m: metrics.psnr(a, b, f) for m, f in f8.items()}
        assert ag["average"] < ag["laplacian"], n
        assert ag["average"] < ag["dwt"], n
        assert qabf["average"] < min(qabf["laplacian"], qabf["dwt"], qabf["max"]), n
        assert psnr["average"] == max(psnr.values()), n


# --------------------------------------------------------------------------- synthetic


def _textured(seed: int, shape: tuple[int, int] = (64, 64)) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = 120 + 80 * np.sin(xx / 4.0 + seed) * np.cos(yy / 6.0) + rng.normal(0, 15, shape)
    return np.asarray(np.clip(img, 0, 255), dtype=np.float64)


def test_average_and_maximum() -> None:
    a = _textured(1)
    b = _textured(2)
    np.testing.assert_array_equal(baselines.average(a, b), (a + b) / 2)
    np.testing.assert_array_equal(baselines.maximum(a, b), np.maximum(a, b))


@pytest.mark.parametrize("method", baselines.BASELINES)
def test_identical_inputs_are_reproduced(method: str) -> None:
    """Fusing an image with itself gives it back (perfect-reconstruction transforms)."""
    a = _textured(3, (50, 70))
    fused = baselines.fuse_baseline(method, a, a)
    assert fused.dtype == np.float64
    assert fused.shape == a.shape
    np.testing.assert_allclose(fused, a, atol=1e-9)


@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (33, 32)])
def test_multiscale_shapes_and_range(shape: tuple[int, int]) -> None:
    """Odd sizes work and the result is clipped to 0..255 even for hard black/white edges."""
    a = np.zeros(shape)
    a[::2, :] = 255.0
    b = np.zeros(shape)
    b[:, ::3] = 255.0
    for fused in (baselines.laplacian_pyramid(a, b), baselines.dwt(a, b)):
        assert fused.shape == shape
        assert fused.dtype == np.float64
        assert fused.min() >= 0.0
        assert fused.max() <= 255.0


def test_detail_selection_keeps_the_stronger_edge() -> None:
    """A step edge present in only one input keeps (nearly) its full height at the edge in the
    multi-scale fusions, while averaging halves it."""
    a = np.full((64, 64), 100.0)
    a[:, 32:] = 200.0
    b = np.full((64, 64), 150.0)
    assert np.abs(np.diff(baselines.average(a, b), axis=1)).max() == pytest.approx(50.0)
    for fused in (baselines.laplacian_pyramid(a, b), baselines.dwt(a, b)):
        assert np.abs(np.diff(fused, axis=1)).max() > 90.0


def test_to_uint8_rounds_half_up() -> None:
    out = baselines.to_uint8(np.array([[0.5, 1.5, 2.49, -3.0, 300.0]]))
    np.testing.assert_array_equal(out, np.array([[1, 2, 2, 0, 255]], dtype=np.uint8))


def test_input_errors() -> None:
    a = np.zeros((32, 32))
    with pytest.raises(InputError, match="shape"):
        baselines.average(a, np.zeros((32, 31)))
    with pytest.raises(InputError, match="2-D"):
        baselines.maximum(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)))
    with pytest.raises(InputError, match="NaN"):
        baselines.dwt(np.full((32, 32), np.nan), a)
    with pytest.raises(InputError, match="levels"):
        baselines.laplacian_pyramid(a, a, levels=0)
    with pytest.raises(InputError, match="too small"):
        baselines.laplacian_pyramid(a, a, levels=6)
    with pytest.raises(InputError, match="wavelet"):
        baselines.dwt(a, a, wavelet="nope")
    with pytest.raises(InputError, match="maximum"):
        baselines.dwt(a, a, levels=9)
    with pytest.raises(InputError, match="mode"):
        baselines.dwt(a, a, mode="nope")
    with pytest.raises(InputError, match="unknown baseline"):
        baselines.fuse_baseline("nope", a, a)
