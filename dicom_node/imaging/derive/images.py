"""The two derived image series: the fused series and the MR resampled on the CT grid.

Both are MR Image Storage instances, one per stored CT slice, in the CT's study and Frame of
Reference (see the package docstring for why MR Image Storage).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import MRImageStorage

from dicom_node.imaging.derive.common import (
    FUSED_BITS_STORED,
    FUSED_MAX,
    MR_ACQUISITION_KEYWORDS,
    NOT_FOR_DOSE,
    SOURCE_PURPOSE,
    DeriveOptions,
    add_common_instance_reference,
    base_dataset,
    check_on_ct_grid,
    code_item,
    copy_attributes,
    decimal_string,
    dicom_date,
    dicom_time,
    fit_lo,
    fused_description,
    input_key,
    mr_references,
    object_uid,
    reference_item,
    registered_mr_description,
    series_number,
    slice_plane,
)
from dicom_node.imaging.volumes import SeriesVolume
from dicom_node.states import DerivedKind


def _image_dataset(
    ct: SeriesVolume,
    k: int,
    *,
    series_uid: str,
    sop_uid: str,
    number: int,
    options: DeriveOptions,
    mr: SeriesVolume,
    sources: Sequence[tuple[Dataset, int | None]],
    pixels: npt.NDArray[Any],
) -> Dataset:
    """One MR Image Storage instance on CT slice ``k`` (modules shared by both image kinds)."""
    ds = base_dataset(ct, MRImageStorage, sop_uid, options)
    ct_ds = ct.datasets[k]
    mr_ref = mr.datasets[0]
    when = options.when()
    # General Series
    ds.Modality = "MR"
    ds.Laterality = ct_ds.get("Laterality", "") or ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    if "PatientPosition" in ct_ds:
        ds.PatientPosition = ct_ds.PatientPosition
    if "BodyPartExamined" in ct_ds:
        ds.BodyPartExamined = ct_ds.BodyPartExamined
    # General Image / Acquisition
    ds.InstanceNumber = k + 1
    ds.ContentDate = dicom_date(when)
    ds.ContentTime = dicom_time(when)
    ds.AcquisitionNumber = ""
    ds.BurnedInAnnotation = "NO"
    lossy = any(str(s.get("LossyImageCompression", "00")) == "01" for s, _ in sources)
    ds.LossyImageCompression = "01" if lossy else "00"
    if sources:  # a registered MR slice beyond the MR's slab has no source (all zero)
        ds.SourceImageSequence = DicomSequence(
            [reference_item(s, f, SOURCE_PURPOSE) for s, f in sources]
        )
    add_common_instance_reference(
        ds,
        ct.study_uid,
        [
            (
                ct.study_uid,
                ct.series_uid,
                [s for s, _ in sources if s.SeriesInstanceUID == ct.series_uid],
            ),
            (
                mr.study_uid,
                mr.series_uid,
                [s for s, _ in sources if s.SeriesInstanceUID == mr.series_uid],
            ),
        ],
    )
    # Image Plane: the CT slice's own values
    plane = slice_plane(ct, k)
    for elem in plane:
        ds[elem.tag] = elem
    # MR Image module: acquisition description of the source MR
    copy_attributes(mr_ref, ds, MR_ACQUISITION_KEYWORDS)
    if not ds.get("ScanningSequence"):
        ds.ScanningSequence = "RM"
    if not ds.get("SequenceVariant"):
        ds.SequenceVariant = "NONE"
    for kw in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
        if kw not in ds:
            setattr(ds, kw, "")
    if "RepetitionTime" not in ds:
        ds.RepetitionTime = ""
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.BitsAllocated = 16
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _window(values: npt.NDArray[Any]) -> tuple[float, float]:
    sel = values[values > 0]
    if sel.size == 0:
        return 1.0, 2.0
    lo, hi = np.percentile(sel[:: max(1, sel.size // 2_000_000)], [0.5, 99.5])
    width = max(float(hi - lo), 2.0)
    return float(np.round((lo + hi) / 2.0)), float(np.round(width))


def fused_series(
    ct: SeriesVolume,
    mr: SeriesVolume,
    fused: sitk.Image,
    *,
    mr_slices: Sequence[Sequence[int]] | None = None,
    method: str = "Res2Net fusion",
    model_version: str = "",
    strategy: str = "",
    options: DeriveOptions,
) -> list[Dataset]:
    """The fused series: one MR Image Storage instance (DERIVED\\SECONDARY) per CT slice.

    ``fused`` is float [0, 1] on the CT image grid; instance ``k`` holds slice
    ``ct.slice_indices[k]`` as 12-bit unsigned values (0..4095). ``mr_slices[k]`` lists the
    MR source slices that contributed to CT slice ``k`` (all MR instances when not given).
    """
    arr = check_on_ct_grid(ct, fused, "fused image")
    key = input_key(ct, mr)
    # The model and strategy are part of the fused objects' identity: other pixels, other UIDs.
    key = hashlib.sha256(f"{key}|{model_version}|{strategy}".encode()).hexdigest()
    series_uid = object_uid(options, key, DerivedKind.FUSED, "series")
    number = series_number(options, DerivedKind.FUSED)
    real_unit = np.asarray(arr[ct.slice_indices], dtype=np.float32)
    real = np.rint(np.clip(real_unit, 0.0, 1.0) * FUSED_MAX).astype(np.uint16)
    center, width = _window(real)
    description = fused_description(options.warnings)
    derivation = fit_lo(
        f"MR-CT fusion: MR rigidly registered to CT (Mattes MI) and resampled linearly onto "
        f"the CT grid; {method}{' (' + strategy + ' strategy)' if strategy else ''}"
        f"{', model ' + model_version if model_version else ''}; CT window image alone "
        f"where the MR has no data. {NOT_FOR_DOSE.capitalize()}.",
        1024,
    )
    comments = "Fused MR-CT image, not for dose calculation. CT window only outside the MR."
    if options.warnings:
        comments += " WARNINGS: " + " | ".join(options.warnings)
    out: list[Dataset] = []
    all_mr = list(range(len(mr.datasets)))
    for k in range(len(ct.datasets)):
        sources = [(ct.datasets[k], ct.frame_numbers[k])]
        sources += mr_references(mr, mr_slices[k] if mr_slices is not None else all_mr)
        ds = _image_dataset(
            ct,
            k,
            series_uid=series_uid,
            sop_uid=object_uid(options, key, DerivedKind.FUSED, "instance", str(k)),
            number=number,
            options=options,
            mr=mr,
            sources=sources,
            pixels=real[k],
        )
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "FUSION"]
        ds.SeriesDescription = description
        ds.DerivationDescription = derivation
        ds.ImageComments = fit_lo(comments, 10240)
        ds.BitsStored = FUSED_BITS_STORED
        ds.HighBit = FUSED_BITS_STORED - 1
        ds.PixelRepresentation = 0
        ds.WindowCenter = [decimal_string(center), decimal_string(FUSED_MAX / 2.0 + 0.5)]
        ds.WindowWidth = [decimal_string(width), decimal_string(FUSED_MAX + 1.0)]
        ds.WindowCenterWidthExplanation = ["AUTO", "FULL RANGE"]
        out.append(ds)
    return out


def registered_mr_series(
    ct: SeriesVolume,
    mr: SeriesVolume,
    mr_on_ct: sitk.Image,
    *,
    mr_slices: Sequence[Sequence[int]] | None = None,
    options: DeriveOptions,
) -> list[Dataset]:
    """The MR resampled onto the CT grid: MR Image Storage in the CT's study and FoR.

    Pixel values are the MR's own intensities (rounded); 0 where the MR has no data.
    """
    arr = check_on_ct_grid(ct, mr_on_ct, "registered MR")
    real = np.asarray(arr, dtype=np.float32)[ct.slice_indices]
    finite = np.nan_to_num(real, nan=0.0, posinf=0.0, neginf=0.0)
    vmin, vmax = float(finite.min()), float(finite.max())
    scale = 1.0
    if vmin >= 0.0 and vmax <= 65535.0:
        pixels: npt.NDArray[Any] = np.rint(finite).astype(np.uint16)
        signed = False
    elif vmin >= -32768.0 and vmax <= 32767.0:
        pixels = np.rint(finite).astype(np.int16)
        signed = True
    else:
        scale = 65535.0 / max(vmax - min(vmin, 0.0), 1e-6)
        pixels = np.rint((finite - min(vmin, 0.0)) * scale).astype(np.uint16)
        signed = False
    key = input_key(ct, mr)
    series_uid = object_uid(options, key, DerivedKind.REGISTERED_MR, "series")
    number = series_number(options, DerivedKind.REGISTERED_MR)
    mr_ref = mr.datasets[0]
    if "WindowCenter" in mr_ref and "WindowWidth" in mr_ref and scale == 1.0:
        wc, ww = mr_ref.WindowCenter, mr_ref.WindowWidth
        center = float(wc[0] if isinstance(wc, Sequence) and not isinstance(wc, str) else wc)
        width = float(ww[0] if isinstance(ww, Sequence) and not isinstance(ww, str) else ww)
    else:
        center, width = _window(pixels.astype(np.float32))
    description = registered_mr_description(mr, options.warnings)
    derivation = fit_lo(
        "MR rigidly registered to the CT (Mattes mutual information) and resampled with "
        "linear interpolation onto the CT grid; 0 where the MR has no data"
        + ("" if scale == 1.0 else f"; intensities scaled by {scale:.6g}")
        + ".",
        1024,
    )
    resample_code = code_item(codes.DCM.SpatialResampling)
    out: list[Dataset] = []
    all_mr = list(range(len(mr.datasets)))
    for k in range(len(ct.datasets)):
        idx = mr_slices[k] if mr_slices is not None else all_mr
        ds = _image_dataset(
            ct,
            k,
            series_uid=series_uid,
            sop_uid=object_uid(options, key, DerivedKind.REGISTERED_MR, "instance", str(k)),
            number=number,
            options=options,
            mr=mr,
            sources=mr_references(mr, idx),
            pixels=pixels[k],
        )
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "RESAMPLED"]
        ds.SeriesDescription = description
        ds.DerivationDescription = derivation
        ds.DerivationCodeSequence = DicomSequence([resample_code])
        if options.warnings:
            ds.ImageComments = fit_lo("WARNINGS: " + " | ".join(options.warnings), 10240)
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.WindowCenter = decimal_string(center)
        ds.WindowWidth = decimal_string(max(width, 1.0))
        out.append(ds)
    return out
