"""What every derived object shares: identity (UIDs, series numbers), the Patient, Study,
Frame of Reference and SOP Common modules copied from the planning CT, and references.

The keyword tables below list the attributes of the Patient and General Study modules (and the
Patient Study module) that are copied from the CT, after PS3.3 C.7.1.1, C.7.2.1 and C.7.2.2.
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
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from dicom_node.config import MAX_UID_ROOT_LENGTH, NodeConfig
from dicom_node.errors import DeriveError
from dicom_node.imaging.identity import MANUFACTURER, MODEL_NAME
from dicom_node.imaging.volumes import SeriesVolume
from dicom_node.states import DerivedKind

NOT_FOR_DOSE = "not for dose calculation"
FUSED_BITS_STORED = 12
FUSED_MAX = (1 << FUSED_BITS_STORED) - 1
KIND_OFFSETS: dict[DerivedKind, int] = {
    DerivedKind.FUSED: 1,
    DerivedKind.REGISTERED_MR: 2,
    DerivedKind.REG: 3,
}
"""SeriesNumber of a derived kind: ``derive.series_number_base + 10 * revision + offset``."""
LO_MAX = 64

PATIENT_KEYWORDS = (
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
STUDY_KEYWORDS = (
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
TYPE2_EMPTY = (
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
MR_ACQUISITION_KEYWORDS = (
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
    """Identity and wording of the derived objects (``NodeConfig.derive`` plus the job's)."""

    uid_root: str
    series_number_base: int
    software_version: str
    salt: str = ""
    revision: int = 0
    created: dt.datetime | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_config(
        cls,
        config: NodeConfig,
        *,
        salt: str = "",
        revision: int = 0,
        warnings: Sequence[str] = (),
        created: dt.datetime | None = None,
    ) -> DeriveOptions:
        """Options of ``config.derive`` for one job (``salt``, ``revision``, ``warnings``)."""
        from fusion_engine import __version__ as engine_version

        return cls(
            uid_root=config.derive.uid_root,
            series_number_base=config.derive.series_number_base,
            software_version=engine_version,
            salt=salt,
            revision=revision,
            created=created,
            warnings=list(warnings),
        )

    def when(self) -> dt.datetime:
        """Creation time stamped on the objects (fixed when ``created`` is given)."""
        return self.created if self.created is not None else dt.datetime.now()


def derive_uid(root: str, *parts: str) -> str:
    """Deterministic UID under ``root`` from a hash of ``parts``.

    ``root == "2.25"`` gives ``2.25.<decimal of a 128-bit UUID-sized hash>`` (PS3.5 B.2);
    any other root gets as many hash digits as fit in the 64-character UID limit.
    """
    root = root.strip().rstrip(".")
    if (
        not root
        or any(not c.isdigit() and c != "." for c in root)
        or len(root) > MAX_UID_ROOT_LENGTH
    ):
        raise DeriveError(
            f"invalid UID root {root!r} (digits and dots, at most {MAX_UID_ROOT_LENGTH} characters)"
        )
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    if root == "2.25":
        return f"2.25.{value}"
    room = LO_MAX - len(root) - 1
    suffix = str(int.from_bytes(digest, "big") % (10**room))
    return f"{root}.{suffix}"


def input_key(ct: SeriesVolume, mr: SeriesVolume) -> str:
    """A digest of both input series' SOP Instance UIDs: the root of every derived UID."""
    ct_uids = sorted(str(ds.SOPInstanceUID) for ds in ct.instances)
    mr_uids = sorted(str(ds.SOPInstanceUID) for ds in mr.instances)
    return hashlib.sha256("\n".join([*ct_uids, "|", *mr_uids]).encode()).hexdigest()


def object_uid(opts: DeriveOptions, key: str, kind: DerivedKind, *parts: str) -> str:
    """The UID of one derived series or instance of ``kind`` (deterministic, see above)."""
    return derive_uid(opts.uid_root, key, kind, opts.salt, str(opts.revision), *parts)


def series_number(opts: DeriveOptions, kind: DerivedKind) -> int:
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


def dicom_date(when: dt.datetime) -> str:
    """DA value of ``when``."""
    return when.strftime("%Y%m%d")


def dicom_time(when: dt.datetime) -> str:
    """TM value of ``when`` (whole seconds)."""
    return when.strftime("%H%M%S")


def decimal_string(value: float) -> str:
    """A DS value of at most 16 characters for ``value``."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.8g}"
    if len(text) > 16:
        text = f"{value:.6e}"
    return text


def copy_attributes(src: Dataset, dst: Dataset, keywords: Sequence[str]) -> None:
    """Copy the ``keywords`` present in ``src`` to ``dst`` (elements as they are)."""
    for kw in keywords:
        if kw in src:
            dst[kw] = src[kw]


def base_dataset(
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
    ds.InstanceCreationDate = dicom_date(when)
    ds.InstanceCreationTime = dicom_time(when)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    copy_attributes(ref, ds, PATIENT_KEYWORDS)
    copy_attributes(ref, ds, STUDY_KEYWORDS)
    for kw in TYPE2_EMPTY:
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


def code_item(code: Code) -> Dataset:
    """A Code Sequence item (PS3.3 8.8) for a code of :data:`pydicom.sr.codedict.codes`."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def reference_item(src: Dataset, frame: int | None, purpose: Code | None) -> Dataset:
    """An image reference item (SOP class, instance, frame, optional purpose of reference)."""
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    if purpose is not None:
        item.PurposeOfReferenceCodeSequence = DicomSequence([code_item(purpose)])
    return item


SOURCE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation


def add_common_instance_reference(
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
            [reference_item(i, None, None) for i in unique_instances(instances)]
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


def unique_instances(instances: Sequence[Dataset]) -> list[Dataset]:
    """``instances`` without repeated SOP Instance UIDs, order kept."""
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


def check_on_ct_grid(ct: SeriesVolume, image: sitk.Image, what: str) -> npt.NDArray[Any]:
    """The voxels of ``image``, which must lie on the CT's grid (else :class:`DeriveError`)."""
    if (
        image.GetSize() != ct.image.GetSize()
        or not np.allclose(image.GetOrigin(), ct.image.GetOrigin(), atol=1e-3)
        or not np.allclose(image.GetDirection(), ct.image.GetDirection(), atol=1e-6)
    ):
        raise DeriveError(f"{what} is not on the CT grid")
    return sitk.GetArrayViewFromImage(image)


def mr_references(mr: SeriesVolume, indices: Sequence[int]) -> list[tuple[Dataset, int | None]]:
    """(dataset, frame number) of the MR source slices ``indices``."""
    return [(mr.datasets[j], mr.frame_numbers[j]) for j in indices]
