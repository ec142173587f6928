"""The registration QA series: what the planner looks at before trusting the fusion.

Three images (axial, coronal, sagittal) through the centre of the MR's field of view on the CT
grid, each with two panels: a checkerboard of CT and registered MR squares, and the registered
MR's edges drawn on the CT. The reliability check's evidence, the warnings and the review status
(reliable; unreliable and not accepted; accepted by whom and when) are burnt into every image,
headed "registration QA - not for diagnosis", and repeated in the DICOM text attributes.

IOD: **Secondary Capture Image Storage** (made with :class:`highdicom.sc.SCImage`), RGB, in the
CT's study. Secondary Capture has no Image Plane module and no Frame of Reference, so a
treatment planning system cannot take these pictures for a planning image or put contours on
them: they are for looking at, not for planning (see :mod:`dicom_node.imaging.derive` for the
planning objects). Nothing that identifies the patient is burnt in (BurnedInAnnotation NO).
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from dicom_node.imaging.derive.common import (
    LO_MAX,
    PATIENT_KEYWORDS,
    SOURCE_PURPOSE,
    STUDY_KEYWORDS,
    DeriveOptions,
    add_common_instance_reference,
    copy_attributes,
    dicom_date,
    dicom_time,
    fit_lo,
    input_key,
    object_uid,
    reference_item,
    series_number,
)
from dicom_node.imaging.identity import MANUFACTURER, MODEL_NAME
from dicom_node.imaging.preview import CHECKER_MM, _checker, _lps_view, _planes
from dicom_node.imaging.volumes import SeriesVolume
from dicom_node.states import DerivedKind

if TYPE_CHECKING:
    from fusion_engine.registration import RegistrationQuality

QA_LABEL = "registration QA - not for diagnosis"
"""The label burnt into every QA image and written into its text attributes (ASCII: the CT's
character set, and the burnt-in font, need not hold an en dash)."""

PANEL_PX = 440
"""The longer side of one panel in display pixels."""
EDGE_PERCENTILE = 88.0
"""MR gradient magnitudes above this percentile (inside the MR's data) are drawn as edges."""
EDGE_COLOUR = (255, 215, 0)
SCALE_BAR_MM = 50.0
FONT_PX = 15
MARGIN = 8
TEXT_WIDTH = 120
"""Characters per burnt-in text line before wrapping."""

RGB = npt.NDArray[np.uint8]
# Radiological views (see :mod:`.preview`): letters at the left, right, top and bottom edges,
# and the DICOM Patient Orientation (row direction, column direction) of each view.
VIEWS: tuple[tuple[str, tuple[str, str, str, str], tuple[str, str]], ...] = (
    ("axial", ("R", "L", "A", "P"), ("L", "P")),
    ("coronal", ("R", "L", "H", "F"), ("L", "F")),
    ("sagittal", ("A", "P", "H", "F"), ("P", "F")),
)


@dataclass(frozen=True)
class Review:
    """Whether and by whom an unreliable registration was accepted (``None``: not accepted)."""

    accepted_by: str | None = None
    accepted_at: str | None = None

    def status(self, reliable: bool) -> str:
        """One line for the images and the descriptions."""
        if reliable:
            return "reliability check passed"
        if self.accepted_by:
            return f"UNRELIABLE - accepted by {self.accepted_by} on {self.accepted_at} after review"
        return "UNRELIABLE - not accepted, not delivered: review before accepting"


@dataclass
class Plane:
    """One view: CT and MR on the unit scale, the MR data mask, pixel size (row, column) mm."""

    name: str
    ct: npt.NDArray[np.float32]
    mr: npt.NDArray[np.float32]
    mask: npt.NDArray[np.bool_]
    pixel_mm: tuple[float, float]
    letters: tuple[str, str, str, str]
    orientation: tuple[str, str]


def _unit(values: npt.NDArray[Any], lo: float, hi: float) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(
        np.float32
    )
    return out


def planes(
    ct: sitk.Image, mr_on_ct: sitk.Image, mask: sitk.Image, ct_window: tuple[float, float]
) -> list[Plane]:
    """Axial, coronal and sagittal planes through the centre of the MR's data on the CT grid."""
    ct_v, (sx, sy, sz), ct_keep = _lps_view(ct)
    mr_v, _, mr_keep = _lps_view(mr_on_ct)
    mask_v, _, mask_keep = _lps_view(mask)
    inside = mask_v > 0
    if inside.any():
        center = tuple(
            int(np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != k))).mean())
            for k in range(3)
        )
        lo, hi = (float(v) for v in np.percentile(mr_v[inside][::7], (1.0, 99.5)))
    else:
        center = tuple(n // 2 for n in ct_v.shape)
        lo, hi = 0.0, 1.0
    level, width = ct_window
    c3 = (center[0], center[1], center[2])
    pixel = [(sy, sx), (sz, sx), (sz, sy)]
    out = []
    for (name, letters, orient), c, m, k, px in zip(
        VIEWS, _planes(ct_v, c3), _planes(mr_v, c3), _planes(inside, c3), pixel, strict=True
    ):
        out.append(
            Plane(
                name,
                _unit(c, level - width / 2.0, level + width / 2.0),
                _unit(m, lo, hi),
                np.asarray(k, dtype=bool),
                (float(px[0]), float(px[1])),
                letters,
                orient,
            )
        )
    del ct_keep, mr_keep, mask_keep
    return out


def _grey(unit: npt.NDArray[np.float32]) -> RGB:
    g = (unit * 255.0 + 0.5).astype(np.uint8)
    out: RGB = np.repeat(g[:, :, None], 3, axis=2)
    return out


def checker_panel(plane: Plane) -> RGB:
    """CT and MR in alternating squares of :data:`CHECKER_MM` (CT only where no MR data)."""
    rows, cols = plane.pixel_mm
    board = _checker(plane.ct.shape, (CHECKER_MM / rows, CHECKER_MM / cols))
    mixed = np.where(board & plane.mask, plane.mr, plane.ct).astype(np.float32)
    return _grey(mixed)


def edge_panel(plane: Plane) -> RGB:
    """The CT with the registered MR's strongest edges on it."""
    out = _grey(plane.ct)
    if not plane.mask.any():
        return out
    rows, cols = plane.pixel_mm
    smooth = ndimage.gaussian_filter(plane.mr, sigma=(1.0 / rows, 1.0 / cols))
    grad = np.hypot(ndimage.sobel(smooth, axis=0) / rows, ndimage.sobel(smooth, axis=1) / cols)
    inner = ndimage.binary_erosion(plane.mask, iterations=2)
    if not inner.any():
        return out
    strong = inner & (grad > np.percentile(grad[inner], EDGE_PERCENTILE))
    out[strong & _ridge(grad)] = EDGE_COLOUR
    return out


def _ridge(grad: npt.NDArray[np.floating]) -> npt.NDArray[np.bool_]:
    """Pixels where the gradient magnitude peaks across rows or across columns (thin edges)."""
    up, down = np.roll(grad, 1, axis=0), np.roll(grad, -1, axis=0)
    left, right = np.roll(grad, 1, axis=1), np.roll(grad, -1, axis=1)
    out: npt.NDArray[np.bool_] = ((grad >= up) & (grad >= down)) | (
        (grad >= left) & (grad >= right)
    )
    return out


def _fit(panel: RGB, pixel_mm: tuple[float, float]) -> Image.Image:
    """The panel resized to its true aspect ratio, longer side :data:`PANEL_PX`."""
    height_mm = panel.shape[0] * pixel_mm[0]
    width_mm = panel.shape[1] * pixel_mm[1]
    scale = PANEL_PX / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return Image.fromarray(panel).resize(size, Image.Resampling.BILINEAR)


def _font(size: int = FONT_PX) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _decorate(img: Image.Image, plane: Plane) -> None:
    """Orientation letters at the four edges and a scale bar."""
    draw = ImageDraw.Draw(img)
    font = _font()
    w, h = img.size
    left, right, top, bottom = plane.letters
    for text, xy in (
        (left, (4, h // 2 - 8)),
        (right, (w - 14, h // 2 - 8)),
        (top, (w // 2 - 5, 3)),
        (bottom, (w // 2 - 5, h - 19)),
    ):
        draw.text(xy, text, fill=(0, 255, 255), font=font)
    mm_per_px = plane.pixel_mm[1] * plane.ct.shape[1] / w
    bar = round(SCALE_BAR_MM / mm_per_px)
    draw.line([(10, h - 10), (10 + bar, h - 10)], fill=(255, 255, 255), width=3)
    draw.text((14 + bar, h - 24), f"{SCALE_BAR_MM:.0f} mm", fill=(255, 255, 255), font=font)


def header_lines(
    quality: RegistrationQuality, warnings: Sequence[str], review: Review
) -> list[tuple[str, tuple[int, int, int]]]:
    """The burnt-in text: label, status, evidence, figures, warnings (wrapped)."""
    ok = quality.reliable or bool(review.accepted_by)
    status_colour = (120, 255, 120) if quality.reliable else (255, 90, 90)
    lines: list[tuple[str, tuple[int, int, int]]] = [
        (QA_LABEL.upper(), (255, 80, 80)),
        (review.status(quality.reliable), status_colour),
        (f"evidence: {quality.summary()}", (255, 255, 255)),
        (
            f"metric {quality.metric_value:.3f}, head-mask Dice {quality.mask_dice:.2f}, "
            f"{quality.angle_from_header_deg:.0f} deg from the header geometry",
            (255, 255, 255),
        ),
    ]
    for warning in warnings:
        for part in textwrap.wrap("WARNING: " + warning, TEXT_WIDTH):
            lines.append((part, (255, 200, 0) if ok else (255, 90, 90)))
    return lines


def compose(
    plane: Plane, lines: Sequence[tuple[str, tuple[int, int, int]]], ct_window: tuple[float, float]
) -> RGB:
    """One QA image: text header, checkerboard and edge panels side by side, a legend."""
    left = _fit(checker_panel(plane), plane.pixel_mm)
    right = _fit(edge_panel(plane), plane.pixel_mm)
    for panel in (left, right):
        _decorate(panel, plane)
    line_px = FONT_PX + 5
    legend = (
        f"{plane.name}: left checkerboard CT / registered MR ({CHECKER_MM:.0f} mm squares), "
        f"right registered MR edges (yellow) on the CT (window {ct_window[0]:.0f}/"
        f"{ct_window[1]:.0f} HU)"
    )
    head = MARGIN + line_px * len(lines) + MARGIN
    width = max(left.width + right.width + 3 * MARGIN, 8 * TEXT_WIDTH)
    height = head + max(left.height, right.height) + line_px + 2 * MARGIN
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, (text, colour) in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * line_px), text, fill=colour, font=font)
    canvas.paste(left, (MARGIN, head))
    canvas.paste(right, (2 * MARGIN + left.width, head))
    draw.text((MARGIN, height - MARGIN - line_px), legend, fill=(200, 200, 200), font=font)
    out: RGB = np.asarray(canvas, dtype=np.uint8)
    return out


def description(quality: RegistrationQuality, warnings: Sequence[str]) -> str:
    """SeriesDescription (<= 64 characters): warnings flagged first, the label, and the two
    distances of the check while they fit (all figures are in ImageComments)."""
    prefix = "CHECK REG! " if warnings or not quality.reliable else ""
    values = {c.name: c.value for c in getattr(quality, "checks", [])}
    text = f"{prefix}{QA_LABEL}"
    if "optimum" in values and "halves" in values:
        figures = f"{text}; optimum {values['optimum']:.1f}, halves {values['halves']:.1f} mm"
        if len(figures) <= LO_MAX:
            text = figures
    return fit_lo(text)


def comments(quality: RegistrationQuality, warnings: Sequence[str], review: Review) -> str:
    """ImageComments: everything burnt into the pictures, as text."""
    parts = [
        QA_LABEL,
        review.status(quality.reliable),
        f"evidence: {quality.summary()}",
        f"metric {quality.metric_value:.4f}, head-mask Dice {quality.mask_dice:.3f}, "
        f"{quality.angle_from_header_deg:.1f} deg from header",
        *(f"WARNING: {w}" for w in warnings),
    ]
    return fit_lo(" | ".join(parts), 10240)


def _sc_image(
    ct: SeriesVolume,
    pixels: RGB,
    orientation: tuple[str, str],
    number: int,
    ids: tuple[str, str, int],
) -> Dataset:
    """One Secondary Capture image in the CT's study (highdicom builds the IOD; the Patient and
    Study attributes are copied from the CT afterwards); ``ids``: series and instance UID,
    series number."""
    from highdicom.sc import SCImage

    series_uid, sop_uid, series = ids
    return SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=ct.study_uid,
        series_instance_uid=series_uid,
        series_number=series,
        sop_instance_uid=sop_uid,
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def qa_series(
    ct: SeriesVolume,
    mr: SeriesVolume,
    images: Sequence[tuple[RGB, tuple[str, str]]],
    quality: RegistrationQuality,
    *,
    warnings: Sequence[str],
    options: DeriveOptions,
    review: Review,
) -> list[Dataset]:
    """The QA series: one Secondary Capture instance per image of :func:`render`."""
    key = input_key(ct, mr)
    series_uid = object_uid(options, key, DerivedKind.QA, "series")
    when = options.when()
    out = []
    for number, (pixels, orientation) in enumerate(images, start=1):
        sop_uid = object_uid(options, key, DerivedKind.QA, "instance", str(number))
        ids = (series_uid, sop_uid, series_number(options, DerivedKind.QA))
        ds = _sc_image(ct, pixels, orientation, number, ids)
        ref = ct.datasets[0]
        copy_attributes(ref, ds, PATIENT_KEYWORDS)
        copy_attributes(ref, ds, STUDY_KEYWORDS)
        ds.SpecificCharacterSet = ref.get("SpecificCharacterSet", "ISO_IR 100") or "ISO_IR 100"
        ds.SeriesDescription = description(quality, warnings)
        ds.ManufacturerModelName = MODEL_NAME
        ds.SoftwareVersions = options.software_version
        ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = dicom_date(when)
        ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = dicom_time(when)
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "REGISTRATION_QA"]
        ds.BurnedInAnnotation = "NO"
        ds.DerivationDescription = fit_lo(
            f"{QA_LABEL}: checkerboard and edge overlay of the MR registered to the "
            "planning CT (rigid, mutual information)",
            1024,
        )
        ds.ImageComments = comments(quality, warnings, review)
        ds.Laterality = ref.get("Laterality", "") or ""
        ds.SourceImageSequence = DicomSequence(
            [reference_item(src, None, SOURCE_PURPOSE) for src in (*ct.instances, *mr.instances)]
        )
        add_common_instance_reference(
            ds,
            ct.study_uid,
            [
                (ct.study_uid, ct.series_uid, ct.instances),
                (mr.study_uid, mr.series_uid, mr.instances),
            ],
        )
        out.append(ds)
    return out


def render(
    ct: sitk.Image,
    mr_on_ct: sitk.Image,
    mask: sitk.Image,
    quality: RegistrationQuality,
    *,
    warnings: Sequence[str],
    ct_window: tuple[float, float],
    review: Review,
) -> list[tuple[RGB, tuple[str, str]]]:
    """The QA pictures (RGB) and the DICOM Patient Orientation of each."""
    lines = header_lines(quality, warnings, review)
    return [
        (compose(plane, lines, ct_window), plane.orientation)
        for plane in planes(ct, mr_on_ct, mask, ct_window)
    ]


def write_qa_png(path: Path, datasets: Sequence[Dataset]) -> Path:
    """The QA pictures of ``datasets`` one above the other as a PNG (the review preview)."""
    from dicom_node.storage.fsutil import write_bytes_durably

    pictures = [np.asarray(ds.pixel_array, dtype=np.uint8) for ds in datasets]
    width = max(p.shape[1] for p in pictures)
    sheet = np.zeros((sum(p.shape[0] for p in pictures), width, 3), dtype=np.uint8)
    top = 0
    for picture in pictures:
        sheet[top : top + picture.shape[0], : picture.shape[1]] = picture
        top += picture.shape[0]
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG", optimize=True)
    write_bytes_durably(path, buffer.getvalue())
    return path
