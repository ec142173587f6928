"""Intensity preparation: scanner values -> network input in [0, 1] and back.

The same functions serve training (``fusion_engine.research.data``) and inference
(``fusion_engine.volume`` / the node), so the network always sees the same scaling:

* CT: Hounsfield units through a linear window (center, width) clipped to [0, 1].
  The default window is :data:`DEFAULT_CT_WINDOW`; see ``docs/fusion_engine.md`` for how it
  was chosen (bone edges and soft tissue both visible).
* MR: robust linear scaling between two percentiles (default 1 and 99.5) of the values inside
  an optional mask (the MR's field of view), clipped to [0, 1]. Percentiles make the scaling
  independent of a few hot voxels and of the scanner's arbitrary units.
* 8-bit PNG inputs (AANLIB) are already windowed by their publisher: they are divided by 255
  (16-bit by 65535), see :func:`png_to_unit`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fusion_engine.defaults import DEFAULT_CT_WINDOW
from fusion_engine.errors import InputError

"""Default CT window (center HU, width HU): -160..240 HU."""

DEFAULT_MR_PERCENTILES: tuple[float, float] = (1.0, 99.5)
"""Default lower and upper percentiles of the MR normalisation."""

FloatArray = npt.NDArray[np.float32]


def _check_window(window: tuple[float, float]) -> tuple[float, float]:
    if len(window) != 2:
        raise InputError(f"CT window must be (center, width), got {window!r}")
    center, width = float(window[0]), float(window[1])
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        raise InputError(f"CT window width must be finite and > 0, got {window!r}")
    return center, width


def ct_to_unit(hu: npt.ArrayLike, window: tuple[float, float] = DEFAULT_CT_WINDOW) -> FloatArray:
    """Map CT Hounsfield units through the window (center, width) to float32 in [0, 1]."""
    center, width = _check_window(window)
    arr = np.asarray(hu, dtype=np.float64)
    lo = center - width / 2.0
    out = (arr - lo) / width
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def unit_to_ct(unit: npt.ArrayLike, window: tuple[float, float] = DEFAULT_CT_WINDOW) -> FloatArray:
    """Inverse of :func:`ct_to_unit` inside the window (values in [0, 1] -> HU)."""
    center, width = _check_window(window)
    arr = np.asarray(unit, dtype=np.float64)
    return (arr * width + center - width / 2.0).astype(np.float32)


def mr_scale(
    values: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES,
) -> tuple[float, float]:
    """The (lo, hi) values that :func:`mr_to_unit` maps to 0 and 1.

    Percentiles are taken over the finite values inside ``mask`` (all values without one).
    """
    p_lo, p_hi = float(percentiles[0]), float(percentiles[1])
    if not (0.0 <= p_lo < p_hi <= 100.0):
        raise InputError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles!r}")
    arr = np.asarray(values, dtype=np.float64)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != arr.shape:
            raise InputError(f"mask shape {m.shape} differs from values shape {arr.shape}")
        sel = arr[m]
    else:
        sel = arr.ravel()
    sel = sel[np.isfinite(sel)]
    if sel.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sel, [p_lo, p_hi])
    lo_f, hi_f = float(lo), float(hi)
    if hi_f <= lo_f:
        hi_f = lo_f + 1.0
    return lo_f, hi_f


def mr_to_unit(
    values: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES,
) -> FloatArray:
    """Scale MR values linearly so the given percentiles become 0 and 1; clip; float32."""
    lo, hi = mr_scale(values, mask, percentiles)
    arr = np.asarray(values, dtype=np.float64)
    out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    out = np.where(np.isfinite(out), out, 0.0)
    if mask is not None:
        out = np.where(np.asarray(mask).astype(bool), out, 0.0)
    return out.astype(np.float32)


def png_to_unit(pixels: npt.ArrayLike) -> FloatArray:
    """Grey PNG pixels (uint8 or uint16) to float32 [0, 1] by the type's full range."""
    arr = np.asarray(pixels)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) / 255.0).astype(np.float32)
    if arr.dtype == np.uint16:
        return (arr.astype(np.float32) / 65535.0).astype(np.float32)
    raise InputError(f"expected uint8 or uint16 pixels, got {arr.dtype}")


def unit_to_uint8(unit: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """[0, 1] floats to uint8 with rounding (values outside are clipped)."""
    arr = np.clip(np.asarray(unit, dtype=np.float64), 0.0, 1.0)
    return np.rint(arr * 255.0).astype(np.uint8)


def unit_to_uint16(unit: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """[0, 1] floats to uint16 with rounding (values outside are clipped)."""
    arr = np.clip(np.asarray(unit, dtype=np.float64), 0.0, 1.0)
    return np.rint(arr * 65535.0).astype(np.uint16)
