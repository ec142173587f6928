"""Derived DICOM objects: fused series, registered MR series, Spatial Registration object.

The only module of the project that creates DICOM objects. Everything made here:

* lives in the CT's study and Frame of Reference, with the Patient and General Study modules
  copied from the CT (the CT is the planning reference the TPS already holds);
* gets UIDs under a configurable root (``derive.uid_root``; ``"2.25"`` means UUID-derived
  ``2.25.<128-bit decimal>``), computed by hashing the SOP Instance UIDs of both inputs, the
  object kind, a ``salt`` (job / software version) and a ``revision``. Re-running a job yields
  the same UIDs, so receivers see the same objects rather than duplicates; pass a new
  ``revision`` when a series must replace an earlier, different one;
* gets a series number ``series_number_base + 10 * revision + k`` (k = 1 fused, 2 registered
  MR, 3 REG): deterministic, never random.

IOD of the fused series: **MR Image Storage** with ImageType ``DERIVED\\SECONDARY``. Why:
it must not be importable as a planning CT (so not CT Image Storage: a TPS would offer it for
dose calculation with meaningless "HU"), yet every common TPS (Eclipse, RayStation, Monaco,
Pinnacle) imports MR Image Storage as a secondary image set with full geometry (Image Plane
module, Frame of Reference) that can be registered, contoured on and fused. Secondary Capture
(single or multi-frame) has no mandatory Image Plane module or Frame of Reference, and several
TPSs either refuse SC images or import them without geometry, so they could not be overlaid
on the planning CT. Enhanced MR is imported by fewer TPS versions than classic MR.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage

from dicom_node.errors import DeriveError
from dicom_node.imaging.volumes import SeriesVolume

SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"
MANUFACTURER = "mrct-fusion-node"
MODEL_NAME = "MR-CT fusion node"
NOT_FOR_DOSE = "not for dose calculation"
FUSED_BITS_STORED = 12
FUSED_MAX = (1 << FUSED_BITS_STORED) - 1
KIND_OFFSETS: dict[str, int] = {"fused": 1, "registered_mr": 2, "reg": 3}
LO_MAX = 64

_PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "QualityControlSubject",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
_STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "ProcedureCodeSequence",
    # Patient Study module
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdditionalPatientHistory",
)
_TYPE2_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_MR_ACQUISITION_KEYWORDS = (
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "SequenceName",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
    "InversionTime",
    "NumberOfAverages",
    "ImagingFrequency",
    "ImagedNucleus",
    "MagneticFieldStrength",
    "EchoNumbers",
    "FlipAngle",
)


@dataclass
class DeriveOptions:
    """Identity and wording of the derived objects (from ``NodeConfig.derive`` and the job)."""

    uid_root: str = "2.25"
    series_number_base: int = 9000
    salt: str = ""
    revision: int = 0
    software_version: str = "0.1.0"
    created: dt.datetime | None = None
    warnings: list[str] = field(default_factory=list)

    def when(self) -> dt.datetime:
        """Creation time stamped on the objects (fixed when ``created`` is given)."""
        return self.created if self.created is not None else dt.datetime.now()


def derive_uid(root: str, *parts: str) -> str:
    """Deterministic UID under ``root`` from a hash of ``parts``.

    ``root == "2.25"`` gives ``2.25.<decimal of a 128-bit UUID-sized hash>`` (PS3.5 B.2);
    any other root gets as many hash digits as fit in the 64-character UID limit.
    """
    root = root.strip().rstrip(".")
    if not root or any(not c.isdigit() and c != "." for c in root) or len(root) > 44:
        raise DeriveError(f"invalid UID root {root!r} (digits and dots, at most 44 characters)")
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    if root == "2.25":
        return f"2.25.{value}"
    room = LO_MAX - len(root) - 1
    suffix = str(int.from_bytes(digest, "big") % (10**room))
    return f"{root}.{suffix}"


def _input_key(ct: SeriesVolume, mr: SeriesVolume) -> str:
    ct_uids = sorted(str(ds.SOPInstanceUID) for ds in ct.instances)
    mr_uids = sorted(str(ds.SOPInstanceUID) for ds in mr.instances)
    return hashlib.sha256("\n".join([*ct_uids, "|", *mr_uids]).encode()).hexdigest()


def _uid(opts: DeriveOptions, key: str, kind: str, *parts: str) -> str:
    return derive_uid(opts.uid_root, key, kind, opts.salt, str(opts.revision), *parts)


def series_number(opts: DeriveOptions, kind: str) -> int:
    """Deterministic series number of a derived kind."""
    return opts.series_number_base + 10 * opts.revision + KIND_OFFSETS[kind]


def fit_lo(text: str, limit: int = LO_MAX) -> str:
    """Trim text to a LO value (``limit`` characters, no backslash)."""
    text = " ".join(text.replace("\\", "/").split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "~"


def fused_description(warnings: Sequence[str]) -> str:
    """SeriesDescription of the fused series (<= 64 characters, warnings flagged first)."""
    base = f"MR-CT fusion, CT only outside MR, {NOT_FOR_DOSE}"
    if warnings:
        base = f"CHECK REG! MR-CT fusion, CT outside MR, {NOT_FOR_DOSE}"
    return fit_lo(base)


def registered_mr_description(mr: SeriesVolume, warnings: Sequence[str]) -> str:
    """SeriesDescription of the registered MR series (<= 64 characters)."""
    source = str(mr.datasets[0].get("SeriesDescription", "") or "MR").strip() or "MR"
    tail = f" reg. to CT, {NOT_FOR_DOSE}"
    prefix = "CHECK REG! " if warnings else ""
    room = LO_MAX - len(prefix) - len(tail)
    if len(source) > room:
        source = source[: room - 1] + "~"
    return fit_lo(prefix + source + tail)


def _da(when: dt.datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: dt.datetime) -> str:
    return when.strftime("%H%M%S")


def _ds(value: float) -> str:
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.8g}"
    if len(text) > 16:
        text = f"{value:.6e}"
    return text


def _copy(src: Dataset, dst: Dataset, keywords: Sequence[str]) -> None:
    for kw in keywords:
        if kw in src:
            dst[kw] = src[kw]


def _base(
    ct: SeriesVolume, sop_class_uid: str, sop_instance_uid: str, opts: DeriveOptions
) -> Dataset:
    """SOP Common, Patient, General Study and Frame of Reference, copied from the CT."""
    ref = ct.datasets[0]
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MRCTNODE_" + opts.software_version.replace(".", "")[:7]
    ds.file_meta = meta
    ds.SpecificCharacterSet = ref.get("SpecificCharacterSet", "ISO_IR 100") or "ISO_IR 100"
    when = opts.when()
    ds.InstanceCreationDate = _da(when)
    ds.InstanceCreationTime = _tm(when)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    _copy(ref, ds, _PATIENT_KEYWORDS)
    _copy(ref, ds, _STUDY_KEYWORDS)
    for kw in _TYPE2_EMPTY:
        if kw not in ds:
            setattr(ds, kw, "")
    ds.StudyInstanceUID = ct.study_uid
    ds.FrameOfReferenceUID = ct.frame_of_reference_uid
    ds.PositionReferenceIndicator = ref.get("PositionReferenceIndicator", "") or ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = opts.software_version
    ds.InstitutionName = ref.get("InstitutionName", "") or ""
    return ds


def _ref_item(src: Dataset, frame: int | None, purpose: tuple[str, str, str] | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    if purpose is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = purpose
        item.PurposeOfReferenceCodeSequence = DicomSequence([code])
    return item


_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def _common_instance_reference(
    ds: Dataset, own_study: str, refs: Sequence[tuple[str, str, Sequence[Dataset]]]
) -> None:
    """Common Instance Reference module: ``refs`` = (study UID, series UID, instances)."""
    same: list[Dataset] = []
    other: dict[str, list[Dataset]] = {}
    for study_uid, series_uid, instances in refs:
        if not instances:
            continue
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedInstanceSequence = DicomSequence(
            [_ref_item(i, None, None) for i in _unique(instances)]
        )
        if study_uid == own_study:
            same.append(series)
        else:
            other.setdefault(study_uid, []).append(series)
    if same:
        ds.ReferencedSeriesSequence = DicomSequence(same)
    if other:
        studies = []
        for study_uid, series_items in other.items():
            study = Dataset()
            study.StudyInstanceUID = study_uid
            study.ReferencedSeriesSequence = DicomSequence(series_items)
            studies.append(study)
        ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence(studies)


def _unique(instances: Sequence[Dataset]) -> list[Dataset]:
    seen: set[str] = set()
    out = []
    for ds in instances:
        uid = str(ds.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            out.append(ds)
    return out


def slice_plane(vol: SeriesVolume, k: int) -> Dataset:
    """Image Plane attributes of source slice ``k`` exactly as stored (single or multi-frame)."""
    src = vol.datasets[k]
    frame = vol.frame_numbers[k]
    plane = Dataset()
    if frame is None:
        plane.ImagePositionPatient = src.ImagePositionPatient
        plane.ImageOrientationPatient = src.ImageOrientationPatient
        plane.PixelSpacing = src.PixelSpacing
        plane.SliceThickness = src.get("SliceThickness", "") or ""
        if "SliceLocation" in src:
            plane.SliceLocation = src.SliceLocation
        return plane
    groups: dict[str, Dataset] = {}
    for seq in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
        for container in (
            src.PerFrameFunctionalGroupsSequence[frame - 1],
            (src.get("SharedFunctionalGroupsSequence") or [Dataset()])[0],
        ):
            if seq in container and len(container[seq].value):
                groups[seq] = container[seq].value[0]
                break
        if seq not in groups:
            raise DeriveError(f"frame {frame} of {src.SOPInstanceUID} has no {seq}")
    plane.ImagePositionPatient = groups["PlanePositionSequence"].ImagePositionPatient
    plane.ImageOrientationPatient = groups["PlaneOrientationSequence"].ImageOrientationPatient
    plane.PixelSpacing = groups["PixelMeasuresSequence"].PixelSpacing
    plane.SliceThickness = groups["PixelMeasuresSequence"].get("SliceThickness", "") or ""
    return plane


def _check_grid(ct: SeriesVolume, image: sitk.Image, what: str) -> npt.NDArray[Any]:
    if (
        image.GetSize() != ct.image.GetSize()
        or not np.allclose(image.GetOrigin(), ct.image.GetOrigin(), atol=1e-3)
        or not np.allclose(image.GetDirection(), ct.image.GetDirection(), atol=1e-6)
    ):
        raise DeriveError(f"{what} is not on the CT grid")
    return sitk.GetArrayViewFromImage(image)


def _mr_refs(mr: SeriesVolume, indices: Sequence[int]) -> list[tuple[Dataset, int | None]]:
    return [(mr.datasets[j], mr.frame_numbers[j]) for j in indices]


def _image_dataset(
    ct: SeriesVolume,
    k: int,
    *,
    series_uid: str,
    sop_uid: str,
    number: int,
    opts: DeriveOptions,
    mr: SeriesVolume,
    sources: Sequence[tuple[Dataset, int | None]],
    pixels: npt.NDArray[Any],
) -> Dataset:
    """One MR Image Storage instance on CT slice ``k`` (modules shared by both image kinds)."""
    ds = _base(ct, MRImageStorage, sop_uid, opts)
    ct_ds = ct.datasets[k]
    mr_ref = mr.datasets[0]
    when = opts.when()
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
    ds.ContentDate = _da(when)
    ds.ContentTime = _tm(when)
    ds.AcquisitionNumber = ""
    ds.BurnedInAnnotation = "NO"
    lossy = any(str(s.get("LossyImageCompression", "00")) == "01" for s, _ in sources)
    ds.LossyImageCompression = "01" if lossy else "00"
    if sources:  # a registered MR slice beyond the MR's slab has no source (all zero)
        ds.SourceImageSequence = DicomSequence(
            [_ref_item(s, f, _SOURCE_PURPOSE) for s, f in sources]
        )
    _common_instance_reference(
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
    _copy(mr_ref, ds, _MR_ACQUISITION_KEYWORDS)
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
    options: DeriveOptions | None = None,
) -> list[Dataset]:
    """The fused series: one MR Image Storage instance (DERIVED\\SECONDARY) per CT slice.

    ``fused`` is float [0, 1] on the CT image grid; instance ``k`` holds slice
    ``ct.slice_indices[k]`` as 12-bit unsigned values (0..4095). ``mr_slices[k]`` lists the
    MR source slices that contributed to CT slice ``k`` (all MR instances when not given).
    """
    opts = options or DeriveOptions()
    arr = _check_grid(ct, fused, "fused image")
    key = _input_key(ct, mr)
    # The model and strategy are part of the fused objects' identity: other pixels, other UIDs.
    key = hashlib.sha256(f"{key}|{model_version}|{strategy}".encode()).hexdigest()
    series_uid = _uid(opts, key, "fused", "series")
    number = series_number(opts, "fused")
    real_unit = np.asarray(arr[ct.slice_indices], dtype=np.float32)
    real = np.rint(np.clip(real_unit, 0.0, 1.0) * FUSED_MAX).astype(np.uint16)
    center, width = _window(real)
    description = fused_description(opts.warnings)
    derivation = fit_lo(
        f"MR-CT fusion: MR rigidly registered to CT (Mattes MI) and resampled linearly onto "
        f"the CT grid; {method}{' (' + strategy + ' strategy)' if strategy else ''}"
        f"{', model ' + model_version if model_version else ''}; CT window image alone "
        f"where the MR has no data. {NOT_FOR_DOSE.capitalize()}.",
        1024,
    )
    comments = "Fused MR-CT image, not for dose calculation. CT window only outside the MR."
    if opts.warnings:
        comments += " WARNINGS: " + " | ".join(opts.warnings)
    out: list[Dataset] = []
    all_mr = list(range(len(mr.datasets)))
    for k in range(len(ct.datasets)):
        sources = [(ct.datasets[k], ct.frame_numbers[k])]
        sources += _mr_refs(mr, mr_slices[k] if mr_slices is not None else all_mr)
        ds = _image_dataset(
            ct,
            k,
            series_uid=series_uid,
            sop_uid=_uid(opts, key, "fused", "instance", str(k)),
            number=number,
            opts=opts,
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
        ds.WindowCenter = [_ds(center), _ds(FUSED_MAX / 2.0 + 0.5)]
        ds.WindowWidth = [_ds(width), _ds(FUSED_MAX + 1.0)]
        ds.WindowCenterWidthExplanation = ["AUTO", "FULL RANGE"]
        out.append(ds)
    return out


def registered_mr_series(
    ct: SeriesVolume,
    mr: SeriesVolume,
    mr_on_ct: sitk.Image,
    *,
    mr_slices: Sequence[Sequence[int]] | None = None,
    options: DeriveOptions | None = None,
) -> list[Dataset]:
    """The MR resampled onto the CT grid: MR Image Storage in the CT's study and FoR.

    Pixel values are the MR's own intensities (rounded); 0 where the MR has no data.
    """
    opts = options or DeriveOptions()
    arr = _check_grid(ct, mr_on_ct, "registered MR")
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
    key = _input_key(ct, mr)
    series_uid = _uid(opts, key, "registered_mr", "series")
    number = series_number(opts, "registered_mr")
    mr_ref = mr.datasets[0]
    if "WindowCenter" in mr_ref and "WindowWidth" in mr_ref and scale == 1.0:
        wc, ww = mr_ref.WindowCenter, mr_ref.WindowWidth
        center = float(wc[0] if isinstance(wc, Sequence) and not isinstance(wc, str) else wc)
        width = float(ww[0] if isinstance(ww, Sequence) and not isinstance(ww, str) else ww)
    else:
        center, width = _window(pixels.astype(np.float32))
    description = registered_mr_description(mr, opts.warnings)
    derivation = fit_lo(
        "MR rigidly registered to the CT (Mattes mutual information) and resampled with "
        "linear interpolation onto the CT grid; 0 where the MR has no data"
        + ("" if scale == 1.0 else f"; intensities scaled by {scale:.6g}")
        + ".",
        1024,
    )
    resample_code = Dataset()
    resample_code.CodeValue, resample_code.CodingSchemeDesignator = "113085", "DCM"
    resample_code.CodeMeaning = "Spatial resampling"
    out: list[Dataset] = []
    all_mr = list(range(len(mr.datasets)))
    for k in range(len(ct.datasets)):
        idx = mr_slices[k] if mr_slices is not None else all_mr
        ds = _image_dataset(
            ct,
            k,
            series_uid=series_uid,
            sop_uid=_uid(opts, key, "registered_mr", "instance", str(k)),
            number=number,
            opts=opts,
            mr=mr,
            sources=_mr_refs(mr, idx),
            pixels=pixels[k],
        )
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "RESAMPLED"]
        ds.SeriesDescription = description
        ds.DerivationDescription = derivation
        ds.DerivationCodeSequence = DicomSequence([resample_code])
        if opts.warnings:
            ds.ImageComments = fit_lo("WARNINGS: " + " | ".join(opts.warnings), 10240)
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(max(width, 1.0))
        out.append(ds)
    return out


def spatial_registration(
    ct: SeriesVolume,
    mr: SeriesVolume,
    matrix_mr_to_ct: npt.ArrayLike,
    *,
    comment: str = "",
    options: DeriveOptions | None = None,
) -> Dataset:
    """Spatial Registration object in the CT's Frame of Reference.

    Item 1 of the Registration Sequence is the CT's own frame (identity); item 2 is the MR's
    frame with ``matrix_mr_to_ct``, the 4x4 RIGID Frame of Reference Transformation Matrix that
    maps MR patient coordinates onto CT patient coordinates (PS3.3 C.20.2).
    """
    opts = options or DeriveOptions()
    matrix = np.asarray(matrix_mr_to_ct, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise DeriveError(f"registration matrix must be a finite 4x4 array, got {matrix.shape}")
    rot = matrix[:3, :3]
    if (
        not np.allclose(rot @ rot.T, np.eye(3), atol=1e-4)
        or np.linalg.det(rot) < 0
        or not (np.allclose(matrix[3], [0, 0, 0, 1]))
    ):
        raise DeriveError("registration matrix is not a rigid transform (RIGID type)")
    key = _input_key(ct, mr)
    uid = _uid(opts, key, "reg", "instance")
    ds = _base(ct, SPATIAL_REGISTRATION_STORAGE, uid, opts)
    when = opts.when()
    ds.Modality = "REG"
    ds.Laterality = ct.datasets[0].get("Laterality", "") or ""
    ds.SeriesInstanceUID = _uid(opts, key, "reg", "series")
    ds.SeriesNumber = series_number(opts, "reg")
    ds.SeriesDescription = fit_lo(
        ("CHECK REG! " if opts.warnings else "") + "MR to CT rigid registration"
    )
    ds.InstanceNumber = 1
    ds.ContentDate = _da(when)
    ds.ContentTime = _tm(when)
    ds.ContentLabel = "MR_TO_CT"
    ds.ContentDescription = fit_lo("Rigid registration of the MR onto the planning CT")
    ds.ContentCreatorName = ""

    def matrix_item(m: npt.NDArray[np.float64], comment_text: str | None) -> Dataset:
        inner = Dataset()
        inner.FrameOfReferenceTransformationMatrixType = "RIGID"
        inner.FrameOfReferenceTransformationMatrix = [_ds(float(v)) for v in m.ravel()]
        reg = Dataset()
        reg.MatrixSequence = DicomSequence([inner])
        reg.RegistrationTypeCodeSequence = DicomSequence()
        if comment_text is not None:
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator = "125024", "DCM"
            code.CodeMeaning = "Image Content-based Alignment"
            reg.RegistrationTypeCodeSequence = DicomSequence([code])
            if comment_text:
                reg.FrameOfReferenceTransformationComment = fit_lo(comment_text)
        return reg

    def registration_item(
        vol: SeriesVolume, m: npt.NDArray[np.float64], comment_text: str | None
    ) -> Dataset:
        item = Dataset()
        item.FrameOfReferenceUID = vol.frame_of_reference_uid
        item.ReferencedImageSequence = DicomSequence(
            [_ref_item(s, None, None) for s in vol.instances]
        )
        item.MatrixRegistrationSequence = DicomSequence([matrix_item(m, comment_text)])
        return item

    text = comment or (
        "CHECK: " + opts.warnings[0] if opts.warnings else "MR patient coords to CT patient coords"
    )
    ds.RegistrationSequence = DicomSequence(
        [
            registration_item(ct, np.eye(4), None),
            registration_item(mr, matrix, text),
        ]
    )
    _common_instance_reference(
        ds,
        ct.study_uid,
        [(ct.study_uid, ct.series_uid, ct.instances), (mr.study_uid, mr.series_uid, mr.instances)],
    )
    return ds
