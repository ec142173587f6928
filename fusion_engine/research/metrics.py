"""Objective image-fusion metrics: AG, SF, EN, MI, PSNR, SSIM, Q_abf and VIFF.

The definitions follow ``../shared/data/metric-golden/README.md`` exactly (the variants used by
the VIFB benchmark and Han's original VIFF code). Images are 2-D 8-bit grey images read as
float64 in 0..255; ``a`` is the CT, ``b`` the MR and ``f`` the fused image.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from fusion_engine.errors import InputError

FloatArray = npt.NDArray[np.float64]

METRIC_NAMES: tuple[str, ...] = ("AG", "SF", "EN", "MI", "PSNR", "SSIM", "Qabf", "VIFF")
"""Metric names in the order (and spelling) of the golden ``values.csv`` columns."""

_PEAK = 255.0

# Q_abf constants (Xydeas & Petrovic 2000).
_TG, _KG, _DG = 0.9994, -15.0, 0.5
_TA, _KA, _DA = 0.9879, -22.0, 0.8
# Correlation kernels equal to MATLAB conv2(img, [-1 0 1; -2 0 2; -1 0 1], 'same') for s_x and
# conv2(img, [1 2 1; 0 0 0; -1 -2 -1], 'same') for s_y (the VIFB code). The signs matter: the
# orientation is pi/2 where s_x = 0 but atan(s_y/s_x) elsewhere, which is not symmetric under a
# sign flip of s_x; with the opposite sign Q_abf moves by up to 0.7 % on the golden set.
_SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
_SOBEL_Y = np.array([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]])

# VIFF constants (Han et al. 2013).
_VIFF_SIGMA_N_SQ = 0.005 * 255.0 * 255.0
_VIFF_C = 1e-7
_VIFF_WEIGHTS = (1.0 / 2.15, 0.0, 0.15 / 2.15, 1.0 / 2.15)
_VIFF_EPS = 1e-10
_VIFF_MIN_SIZE = 41  # smallest side for which all four valid-filtered scales are non-empty


# --------------------------------------------------------------------------- input checks


def _as_image(x: npt.ArrayLike, name: str) -> FloatArray:
    """Return ``x`` as a 2-D float64 array, raising InputError when it is not one."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: not a numeric array ({exc})") from exc
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-D image, got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"{name}: image {arr.shape} is too small (need at least 2x2)")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: image contains NaN or infinite values")
    return arr


def _as_images(*named: tuple[npt.ArrayLike, str]) -> list[FloatArray]:
    """Validate several images and check that they all have the same shape."""
    arrays = [_as_image(x, name) for x, name in named]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        desc = ", ".join(f"{name}={a.shape}" for a, (_, name) in zip(arrays, named, strict=True))
        raise InputError(f"images differ in shape: {desc}")
    return arrays


def _grey_levels(x: FloatArray, name: str) -> npt.NDArray[np.intp]:
    """Round half up (MATLAB ``round`` for non-negative values) and check for 0..255."""
    levels = np.floor(x + 0.5)
    if levels.min() < 0 or levels.max() > 255:
        raise InputError(f"{name}: grey levels must lie in 0..255 for histogram metrics")
    return levels.astype(np.intp)


# --------------------------------------------------------------------------- helpers


def _gaussian_1d(size: int, sigma: float) -> FloatArray:
    """Normalised 1-D Gaussian; its outer product equals MATLAB ``fspecial('gaussian')``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g: FloatArray = np.exp(-(x * x) / (2.0 * sigma * sigma))
    result: FloatArray = g / g.sum()
    return result


def _filter_valid(x: FloatArray, w: FloatArray) -> FloatArray:
    """Separable 'valid' correlation of ``x`` with the window ``outer(w, w)``.

    Equals MATLAB ``filter2(w' * w, x, 'valid')`` (the window is symmetric).
    """
    n = w.size
    rows = x.shape[0] - n + 1
    cols = x.shape[1] - n + 1
    if rows < 1 or cols < 1:
        raise InputError(f"image {x.shape} is smaller than the {n}x{n} filter window")
    tmp: FloatArray = w[0] * x[:rows, :]
    for k in range(1, n):
        tmp = tmp + w[k] * x[k : k + rows, :]
    out: FloatArray = w[0] * tmp[:, :cols]
    for k in range(1, n):
        out = out + w[k] * tmp[:, k : k + cols]
    return out


# --------------------------------------------------------------------------- single-image metrics


def ag(f: npt.ArrayLike) -> float:
    """Average gradient: mean of sqrt((dx^2 + dy^2) / 2) over forward differences."""
    x = _as_image(f, "f")
    dr = x[1:, :-1] - x[:-1, :-1]
    dc = x[:-1, 1:] - x[:-1, :-1]
    return float(np.mean(np.sqrt((dr * dr + dc * dc) / 2.0)))


def sf(f: npt.ArrayLike) -> float:
    """Spatial frequency sqrt(RF^2 + CF^2) from RMS row and column differences."""
    x = _as_image(f, "f")
    d_row = np.diff(x, axis=1)  # differences along a row
    d_col = np.diff(x, axis=0)  # differences along a column
    rf_sq = float(np.mean(d_row * d_row))
    cf_sq = float(np.mean(d_col * d_col))
    return math.sqrt(rf_sq + cf_sq)


def en(f: npt.ArrayLike) -> float:
    """Shannon entropy (bits) of the 256-bin grey-level histogram of ``f``."""
    levels = _grey_levels(_as_image(f, "f"), "f")
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / levels.size
    return float(-np.sum(p * np.log2(p)))


# --------------------------------------------------------------------------- two-image metrics


def mutual_information(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Mutual information (bits) from the 256x256 joint histogram of integer grey levels."""
    ax, ay = _as_images((x, "x"), (y, "y"))
    lx = _grey_levels(ax, "x").ravel()
    ly = _grey_levels(ay, "y").ravel()
    joint = np.bincount(lx * 256 + ly, minlength=256 * 256).astype(np.float64)
    joint = joint.reshape(256, 256) / lx.size
    px = joint.sum(axis=1)
    py = joint.sum(axis=0)
    nz = joint > 0
    outer = np.outer(px, py)
    return float(np.sum(joint[nz] * np.log2(joint[nz] / outer[nz])))


def mse(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Mean squared error of two images."""
    ax, ay = _as_images((x, "x"), (y, "y"))
    d = ax - ay
    return float(np.mean(d * d))


def ssim_pair(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Mean SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, valid region only."""
    ax, ay = _as_images((x, "x"), (y, "y"))
    w = _gaussian_1d(11, 1.5)
    c1 = (0.01 * _PEAK) ** 2
    c2 = (0.03 * _PEAK) ** 2
    mu_x = _filter_valid(ax, w)
    mu_y = _filter_valid(ay, w)
    mu_xx = mu_x * mu_x
    mu_yy = mu_y * mu_y
    mu_xy = mu_x * mu_y
    s_xx = _filter_valid(ax * ax, w) - mu_xx
    s_yy = _filter_valid(ay * ay, w) - mu_yy
    s_xy = _filter_valid(ax * ay, w) - mu_xy
    num = (2.0 * mu_xy + c1) * (2.0 * s_xy + c2)
    den = (mu_xx + mu_yy + c1) * (s_xx + s_yy + c2)
    return float(np.mean(num / den))


# --------------------------------------------------------------------------- fusion metrics


def mi(a: npt.ArrayLike, b: npt.ArrayLike, f: npt.ArrayLike) -> float:
    """Fusion mutual information MI(A,F) + MI(B,F) in bits."""
    xa, xb, xf = _as_images((a, "a"), (b, "b"), (f, "f"))
    return mutual_information(xa, xf) + mutual_information(xb, xf)


def psnr(a: npt.ArrayLike, b: npt.ArrayLike, f: npt.ArrayLike) -> float:
    """PSNR in dB with MSE = (MSE(A,F) + MSE(B,F)) / 2; ``inf`` when F equals both sources."""
    xa, xb, xf = _as_images((a, "a"), (b, "b"), (f, "f"))
    m = (mse(xa, xf) + mse(xb, xf)) / 2.0
    if m == 0.0:
        return math.inf
    return 10.0 * math.log10(_PEAK * _PEAK / m)


def ssim(a: npt.ArrayLike, b: npt.ArrayLike, f: npt.ArrayLike) -> float:
    """Fusion SSIM (SSIM(A,F) + SSIM(B,F)) / 2."""
    xa, xb, xf = _as_images((a, "a"), (b, "b"), (f, "f"))
    return (ssim_pair(xa, xf) + ssim_pair(xb, xf)) / 2.0


def _sobel_edges(x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Edge strength and orientation (atan(sy/sx), pi/2 where sx = 0), zero padding."""
    sx = ndimage.correlate(x, _SOBEL_X, mode="constant", cval=0.0)
    sy = ndimage.correlate(x, _SOBEL_Y, mode="constant", cval=0.0)
    strength = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(zero, math.pi / 2.0, np.arctan(sy / np.where(zero, 1.0, sx)))
    return strength, angle


def _edge_preservation(
    g_src: FloatArray, a_src: FloatArray, g_f: FloatArray, a_f: FloatArray
) -> FloatArray:
    """Per-pixel edge preservation Q^{XF} = Q_g * Q_alpha."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(g_src > g_f, g_f / g_src, g_src / g_f)
    ratio = np.where(g_src == g_f, 1.0, ratio)
    orient = 1.0 - np.abs(a_src - a_f) / (math.pi / 2.0)
    q_g = _TG / (1.0 + np.exp(_KG * (ratio - _DG)))
    q_a = _TA / (1.0 + np.exp(_KA * (orient - _DA)))
    result: FloatArray = q_g * q_a
    return result


def q_abf(a: npt.ArrayLike, b: npt.ArrayLike, f: npt.ArrayLike) -> float:
    """Xydeas-Petrovic edge-transfer metric Q^{AB/F} (weights = source edge strength, L = 1).

    Returns 0.0 when neither source has any edge (the ratio is undefined).
    """
    xa, xb, xf = _as_images((a, "a"), (b, "b"), (f, "f"))
    g_a, a_a = _sobel_edges(xa)
    g_b, a_b = _sobel_edges(xb)
    g_f, a_f = _sobel_edges(xf)
    q_af = _edge_preservation(g_a, a_a, g_f, a_f)
    q_bf = _edge_preservation(g_b, a_b, g_f, a_f)
    den = float(np.sum(g_a + g_b))
    if den == 0.0:
        return 0.0
    return float(np.sum(q_af * g_a + q_bf * g_b)) / den


def _viff_scales(
    ref: FloatArray, dist: FloatArray
) -> list[tuple[FloatArray, FloatArray, FloatArray]]:
    """Per-scale (VID, VIND, gain) maps of Han's VIFF for one source/fused pair."""
    out: list[tuple[FloatArray, FloatArray, FloatArray]] = []
    for scale in range(1, 5):
        size = 2 ** (4 - scale + 1) + 1
        w = _gaussian_1d(size, size / 5.0)
        if scale > 1:
            ref = _filter_valid(ref, w)[::2, ::2]
            dist = _filter_valid(dist, w)[::2, ::2]
        mu1 = _filter_valid(ref, w)
        mu2 = _filter_valid(dist, w)
        s1 = _filter_valid(ref * ref, w) - mu1 * mu1
        s2 = _filter_valid(dist * dist, w) - mu2 * mu2
        s12 = _filter_valid(ref * dist, w) - mu1 * mu2
        s1 = np.maximum(s1, 0.0)
        s2 = np.maximum(s2, 0.0)
        g = s12 / (s1 + _VIFF_EPS)
        sv = s2 - g * s12
        low1 = s1 < _VIFF_EPS
        g = np.where(low1, 0.0, g)
        sv = np.where(low1, s2, sv)
        s1 = np.where(low1, 0.0, s1)
        low2 = s2 < _VIFF_EPS
        g = np.where(low2, 0.0, g)
        sv = np.where(low2, 0.0, sv)
        neg = g < 0
        sv = np.where(neg, s2, sv)
        g = np.where(neg, 0.0, g)
        sv = np.maximum(sv, _VIFF_EPS)
        vid = np.log10(1.0 + g * g * s1 / (sv + _VIFF_SIGMA_N_SQ))
        vind = np.log10(1.0 + s1 / _VIFF_SIGMA_N_SQ)
        out.append((vid, vind, g))
    return out


def viff(a: npt.ArrayLike, b: npt.ArrayLike, f: npt.ArrayLike) -> float:
    """Visual information fidelity for fusion (Han, Cai, Cao, Xu 2013).

    Four scales with Gaussian windows of 17, 9, 5 and 3 pixels (sigma = size / 5), valid
    filtering and 2x downsampling; per coefficient the source with the smaller gain is kept.
    """
    xa, xb, xf = _as_images((a, "a"), (b, "b"), (f, "f"))
    if min(xa.shape) < _VIFF_MIN_SIZE:
        raise InputError(
            f"VIFF needs images of at least {_VIFF_MIN_SIZE}x{_VIFF_MIN_SIZE} pixels, "
            f"got {xa.shape}"
        )
    sa = _viff_scales(xa, xf)
    sb = _viff_scales(xb, xf)
    total = 0.0
    for weight, (vid_a, vind_a, g_a), (vid_b, vind_b, g_b) in zip(
        _VIFF_WEIGHTS, sa, sb, strict=True
    ):
        pick_a = g_a < g_b
        vid = np.where(pick_a, vid_a, vid_b)
        vind = np.where(pick_a, vind_a, vind_b)
        ratio = float(np.sum(vid + _VIFF_C)) / float(np.sum(vind + _VIFF_C))
        total += weight * ratio
    return total


def all_metrics(a: npt.ArrayLike, b: npt.ArrayLike, f: npt.ArrayLike) -> dict[str, float]:
    """All eight metrics, keyed by the names in ``METRIC_NAMES``."""
    xa, xb, xf = _as_images((a, "a"), (b, "b"), (f, "f"))
    return {
        "AG": ag(xf),
        "SF": sf(xf),
        "EN": en(xf),
        "MI": mi(xa, xb, xf),
        "PSNR": psnr(xa, xb, xf),
        "SSIM": ssim(xa, xb, xf),
        "Qabf": q_abf(xa, xb, xf),
        "VIFF": viff(xa, xb, xf),
    }
