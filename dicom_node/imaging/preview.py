"""PNG preview of a fusion: does the registration look right at a glance?

Rows: CT (window), registered MR, fused, CT/MR checkerboard; columns: axial, coronal,
sagittal planes through the centre of the region where the MR has data. The volumes are
reoriented to LPS first, so every view is in radiological convention: axial seen from the
feet (patient left on the image right, anterior up), coronal seen from the front, sagittal
from the patient's left, superior up. Pixels are drawn with their true aspect ratio.
Warnings are printed in red under the title.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from fusion_engine.defaults import DEFAULT_CT_WINDOW
from fusion_engine.intensity import ct_to_unit, mr_scale

FloatArray = npt.NDArray[np.float32]
CHECKER_MM = 16.0
"""Edge of a checkerboard square in millimetres."""


def _lps_view(image: sitk.Image) -> tuple[npt.NDArray[Any], tuple[float, float, float], sitk.Image]:
    """Array (z, y, x) of the image in LPS axis order and its (x, y, z) spacing.

    For the usual axis-aligned directions this is a view (transpose + flips, no copy); an
    oblique image is reoriented to the closest LPS orientation by SimpleITK. The image returned
    third must stay alive as long as the view is used.
    """
    d = np.array(image.GetDirection()).reshape(3, 3)
    perm = np.argmax(np.abs(d), axis=0)  # image axis i runs along LPS axis perm[i]
    aligned = sorted(perm.tolist()) == [0, 1, 2] and np.allclose(
        np.abs(d[perm, [0, 1, 2]]), 1.0, atol=1e-3
    )
    if not aligned:
        image = sitk.DICOMOrient(image, "LPS")
        d = np.eye(3)
        perm = np.array([0, 1, 2])
    arr = sitk.GetArrayViewFromImage(image)  # array axis 2 - i is image axis i
    spacing = image.GetSpacing()
    axis_of = [int(np.flatnonzero(perm == j)[0]) for j in range(3)]  # LPS axis j -> image axis
    view = arr.transpose([2 - axis_of[2], 2 - axis_of[1], 2 - axis_of[0]])
    for k, j in enumerate((2, 1, 0)):
        if d[j, axis_of[j]] < 0:
            view = np.flip(view, axis=k)
    lps_spacing = (spacing[axis_of[0]], spacing[axis_of[1]], spacing[axis_of[2]])
    return view, (float(lps_spacing[0]), float(lps_spacing[1]), float(lps_spacing[2])), image


def _planes(vol: npt.NDArray[Any], center: tuple[int, int, int]) -> list[npt.NDArray[Any]]:
    z, y, x = center
    axial = vol[z]
    coronal = vol[:, y, :][::-1]  # superior up
    sagittal = vol[:, :, x][::-1]
    return [axial, coronal, sagittal]


def _checker(shape: tuple[int, int], cell: tuple[float, float]) -> npt.NDArray[np.bool_]:
    rows = (np.arange(shape[0]) // max(cell[0], 1.0)).astype(int)
    cols = (np.arange(shape[1]) // max(cell[1], 1.0)).astype(int)
    board: npt.NDArray[np.bool_] = ((rows[:, None] + cols[None, :]) % 2) == 0
    return board


Rows = list[tuple[str, list[FloatArray]]]


def _center_and_mr_range(
    mask_v: npt.NDArray[Any], mr_v: npt.NDArray[Any]
) -> tuple[tuple[int, int, int], float, float]:
    """Centre of the MR's data region (z, y, x) and a robust MR intensity range."""
    m = mask_v > 0
    if not m.any():
        return (mask_v.shape[0] // 2, mask_v.shape[1] // 2, mask_v.shape[2] // 2), 0.0, 1.0
    bounds = []
    for axis in range(3):
        hit = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append((int(hit[0]) + int(hit[-1])) // 2)
    # Robust MR scaling from a strided sample (the same percentiles as the model input).
    lo, hi = mr_scale(mr_v[::2, ::2, ::2], m[::2, ::2, ::2])
    return (bounds[0], bounds[1], bounds[2]), lo, hi


def preview_rows(
    ct: sitk.Image,
    mr_on_ct: sitk.Image,
    mask: sitk.Image,
    fused: sitk.Image,
    ct_window: tuple[float, float],
) -> tuple[Rows, list[tuple[float, float]]]:
    """The labelled rows of planes (CT, registered MR, fused, checkerboard), in [0, 1], and
    the (row, column) pixel size in mm of the axial, coronal and sagittal planes."""
    ct_v, (sx, sy, sz), ct_keep = _lps_view(ct)
    mr_v, _, mr_keep = _lps_view(mr_on_ct)
    mask_v, _, mask_keep = _lps_view(mask)
    fused_v, _, fused_keep = _lps_view(fused)
    c3, lo, hi = _center_and_mr_range(mask_v, mr_v)

    def mr_unit(plane: npt.NDArray[Any]) -> FloatArray:
        return np.clip((plane - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    rows: Rows = [
        ("CT", [ct_to_unit(p, ct_window) for p in _planes(ct_v, c3)]),
        ("registered MR", [mr_unit(p) for p in _planes(mr_v, c3)]),
        ("fused", [np.array(p, dtype=np.float32, copy=True) for p in _planes(fused_v, c3)]),
    ]
    del ct_keep, mr_keep, mask_keep, fused_keep
    # Plane pixel sizes (row, column) in mm: axial (y, x), coronal (z, x), sagittal (z, y).
    pixel_mm = [(sy, sx), (sz, sx), (sz, sy)]
    checks = []
    for a, b, (pr, pc) in zip(rows[0][1], rows[1][1], pixel_mm, strict=True):
        board = _checker(a.shape, (CHECKER_MM / pr, CHECKER_MM / pc))
        checks.append(np.where(board, a, b).astype(np.float32))
    rows.append(("checkerboard CT/MR", checks))
    return rows, pixel_mm


def write_preview(
    path: Path,
    *,
    ct: sitk.Image,
    mr_on_ct: sitk.Image,
    mask: sitk.Image,
    fused: sitk.Image,
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW,
    warnings: Sequence[str] = (),
    title: str = "MR-CT fusion",
    dpi: int = 100,
) -> Path:
    """Write the 4 x 3 preview grid as a PNG at ``path`` and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, pixel_mm = preview_rows(ct, mr_on_ct, mask, fused, ct_window)
    fig = Figure(figsize=(12, 15.5), facecolor="black")
    FigureCanvasAgg(fig)
    top = 0.955
    if warnings:
        wrapped = "\n".join(textwrap.fill("WARNING: " + w, 130) for w in warnings)
        fig.text(0.5, 0.97, wrapped, color="red", ha="center", va="top", fontsize=9)
        top = 0.95 - 0.0105 * (wrapped.count("\n") + 1)
    fig.suptitle(title, color="white", fontsize=11, y=0.993)
    spacing = {"left": 0.06, "right": 0.99, "bottom": 0.01, "top": top}
    axes = fig.subplots(4, 3, gridspec_kw={**spacing, "wspace": 0.02, "hspace": 0.06})
    for r, (label, planes) in enumerate(rows):
        for c, (plane, (pr, pc)) in enumerate(zip(planes, pixel_mm, strict=True)):
            ax = axes[r][c]
            ax.imshow(
                plane, cmap="gray", vmin=0.0, vmax=1.0, aspect=pr / pc, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            if c == 0:
                ax.set_ylabel(label, color="white", fontsize=10)
            if r == 0:
                ax.set_title(("axial", "coronal", "sagittal")[c], color="white", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="black")
    return path
