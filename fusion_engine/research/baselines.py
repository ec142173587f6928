"""Classical pixel-level fusion baselines: average, maximum, Laplacian pyramid and DWT.

All functions take two 2-D images of the same shape (float, 0..255 grey levels; ``a`` = CT,
``b`` = MR) and return the fused image as float64 clipped to 0..255, not rounded. The defaults
reproduce the reference fusions in ``../shared/data/metric-golden/fused`` pixel for pixel after
rounding half up (``to_uint8``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pywt
from scipy import ndimage

from fusion_engine.errors import InputError

FloatArray = npt.NDArray[np.float64]

BASELINES: tuple[str, ...] = ("average", "max", "laplacian", "dwt")
"""Names of the baselines (the folder names of the golden reference fusions)."""

# Burt & Adelson generating kernel with a = 0.375, i.e. [1 4 6 4 1] / 16.
_BURT_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
# Half-sample symmetric extension (d c b a | a b c d), as MATLAB's 'symmetric' padding.
_PYRAMID_MODE = "reflect"


def _check_pair(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Return both inputs as finite 2-D float64 arrays of the same shape, or raise InputError."""
    out: list[FloatArray] = []
    for x, name in ((a, "a"), (b, "b")):
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: not a numeric array ({exc})") from exc
        if arr.ndim != 2 or arr.size == 0:
            raise InputError(f"{name}: expected a non-empty 2-D image, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: image contains NaN or infinite values")
        out.append(arr)
    if out[0].shape != out[1].shape:
        raise InputError(f"images differ in shape: a={out[0].shape}, b={out[1].shape}")
    return out[0], out[1]


def _clip(x: FloatArray) -> FloatArray:
    """Clip to the 8-bit grey range, as float64."""
    result: FloatArray = np.clip(x, 0.0, 255.0).astype(np.float64, copy=False)
    return result


def _select_max_abs(x: FloatArray, y: FloatArray) -> FloatArray:
    """Per coefficient, the one with the larger magnitude (``x`` on ties)."""
    result: FloatArray = np.where(np.abs(x) >= np.abs(y), x, y)
    return result


def to_uint8(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Round half up (MATLAB ``uint8``) and clip to 0..255; how the references were saved."""
    arr = np.asarray(x, dtype=np.float64)
    return np.clip(np.floor(arr + 0.5), 0.0, 255.0).astype(np.uint8)


def average(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Pixel-wise mean of the two images."""
    xa, xb = _check_pair(a, b)
    return _clip((xa + xb) / 2.0)


def maximum(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Pixel-wise maximum of the two images."""
    xa, xb = _check_pair(a, b)
    return _clip(np.maximum(xa, xb))


def _blur(x: FloatArray, kernel: FloatArray) -> FloatArray:
    """Separable filtering with half-sample symmetric borders."""
    y = ndimage.correlate1d(x, kernel, axis=0, mode=_PYRAMID_MODE)
    result: FloatArray = ndimage.correlate1d(y, kernel, axis=1, mode=_PYRAMID_MODE)
    return result


def _reduce(x: FloatArray) -> FloatArray:
    """Burt-Adelson REDUCE: blur, keep every second row and column."""
    return _blur(x, _BURT_KERNEL)[::2, ::2]


def _expand(x: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Burt-Adelson EXPAND to ``shape``: zero insertion, blur with 4x the kernel."""
    up = np.zeros(shape, dtype=np.float64)
    up[::2, ::2] = x
    return _blur(up, 2.0 * _BURT_KERNEL)


def _laplacian(x: FloatArray, levels: int) -> tuple[list[FloatArray], FloatArray]:
    """Laplacian pyramid: ``levels`` detail bands (finest first) and the Gaussian base."""
    details: list[FloatArray] = []
    g = x
    for _ in range(levels):
        smaller = _reduce(g)
        details.append(g - _expand(smaller, (g.shape[0], g.shape[1])))
        g = smaller
    return details, g


def laplacian_pyramid(a: npt.ArrayLike, b: npt.ArrayLike, levels: int = 4) -> FloatArray:
    """Laplacian-pyramid fusion (Burt & Adelson): max-abs detail coefficients, averaged base.

    Kernel [1 4 6 4 1]/16, symmetric borders, ``levels`` detail bands.
    """
    xa, xb = _check_pair(a, b)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise InputError(f"levels must be a positive integer, got {levels!r}")
    if min(xa.shape) < 2**levels:
        raise InputError(f"image {xa.shape} too small for a {levels}-level pyramid")
    det_a, base_a = _laplacian(xa, levels)
    det_b, base_b = _laplacian(xb, levels)
    fused = (base_a + base_b) / 2.0
    for da, db in zip(reversed(det_a), reversed(det_b), strict=True):
        fused = _expand(fused, (da.shape[0], da.shape[1])) + _select_max_abs(da, db)
    return _clip(fused)


def dwt(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    wavelet: str = "db2",
    levels: int = 3,
    mode: str = "symmetric",
) -> FloatArray:
    """2-D DWT fusion with PyWavelets: max-abs detail coefficients, averaged approximation."""
    xa, xb = _check_pair(a, b)
    try:
        wav = pywt.Wavelet(wavelet)
    except ValueError as exc:
        raise InputError(f"unknown wavelet {wavelet!r}") from exc
    if mode not in pywt.Modes.modes:
        raise InputError(f"unknown signal extension mode {mode!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise InputError(f"levels must be a positive integer, got {levels!r}")
    max_level = int(pywt.dwt_max_level(min(xa.shape), wav.dec_len))
    if levels > max_level:
        raise InputError(
            f"{levels} levels of {wavelet} exceed the maximum {max_level} for image {xa.shape}"
        )
    ca = pywt.wavedec2(xa, wav, mode=mode, level=levels)
    cb = pywt.wavedec2(xb, wav, mode=mode, level=levels)
    coeffs: list[object] = [(np.asarray(ca[0]) + np.asarray(cb[0])) / 2.0]
    for da, db in zip(ca[1:], cb[1:], strict=True):
        coeffs.append(
            tuple(
                _select_max_abs(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
                for x, y in zip(da, db, strict=True)
            )
        )
    rec = np.asarray(pywt.waverec2(coeffs, wav, mode=mode), dtype=np.float64)
    return _clip(rec[: xa.shape[0], : xa.shape[1]])


def fuse_baseline(name: str, a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Run the baseline called ``name`` (one of ``BASELINES``) with its default settings."""
    if name == "average":
        return average(a, b)
    if name == "max":
        return maximum(a, b)
    if name == "laplacian":
        return laplacian_pyramid(a, b)
    if name == "dwt":
        return dwt(a, b)
    raise InputError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
