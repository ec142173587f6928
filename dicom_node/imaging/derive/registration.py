"""The Spatial Registration object (PS3.3 A.39): the MR -> CT rigid matrix for the TPS."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import SpatialRegistrationStorage

from dicom_node.errors import DeriveError
from dicom_node.imaging.derive.common import (
    DeriveOptions,
    add_common_instance_reference,
    base_dataset,
    code_item,
    decimal_string,
    dicom_date,
    dicom_time,
    fit_lo,
    input_key,
    object_uid,
    reference_item,
    series_number,
)
from dicom_node.imaging.volumes import SeriesVolume
from dicom_node.states import DerivedKind


def _check_rigid(matrix_mr_to_ct: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The matrix as a 4x4 array; :class:`DeriveError` unless it is a finite rigid transform."""
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
    return matrix


def _matrix_item(m: npt.NDArray[np.float64], comment: str | None) -> Dataset:
    """A Matrix Registration item; ``comment`` None marks the reference frame (identity)."""
    inner = Dataset()
    inner.FrameOfReferenceTransformationMatrixType = "RIGID"
    inner.FrameOfReferenceTransformationMatrix = [decimal_string(float(v)) for v in m.ravel()]
    reg = Dataset()
    reg.MatrixSequence = DicomSequence([inner])
    reg.RegistrationTypeCodeSequence = DicomSequence()
    if comment is not None:
        code = code_item(codes.DCM.ImageContentBasedAlignment)
        reg.RegistrationTypeCodeSequence = DicomSequence([code])
        if comment:
            reg.FrameOfReferenceTransformationComment = fit_lo(comment)
    return reg


def _registration_item(
    vol: SeriesVolume, m: npt.NDArray[np.float64], comment: str | None
) -> Dataset:
    """One Registration Sequence item: a series' frame of reference, its images, its matrix."""
    item = Dataset()
    item.FrameOfReferenceUID = vol.frame_of_reference_uid
    item.ReferencedImageSequence = DicomSequence(
        [reference_item(s, None, None) for s in vol.instances]
    )
    item.MatrixRegistrationSequence = DicomSequence([_matrix_item(m, comment)])
    return item


def spatial_registration(
    ct: SeriesVolume,
    mr: SeriesVolume,
    matrix_mr_to_ct: npt.ArrayLike,
    *,
    comment: str = "",
    options: DeriveOptions,
) -> Dataset:
    """Spatial Registration object in the CT's Frame of Reference.

    Item 1 of the Registration Sequence is the CT's own frame (identity); item 2 is the MR's
    frame with ``matrix_mr_to_ct``, the 4x4 RIGID Frame of Reference Transformation Matrix that
    maps MR patient coordinates onto CT patient coordinates (PS3.3 C.20.2).
    """
    matrix = _check_rigid(matrix_mr_to_ct)
    key = input_key(ct, mr)
    uid = object_uid(options, key, DerivedKind.REG, "instance")
    ds = base_dataset(ct, SpatialRegistrationStorage, uid, options)
    when = options.when()
    ds.Modality = "REG"
    ds.Laterality = ct.datasets[0].get("Laterality", "") or ""
    ds.SeriesInstanceUID = object_uid(options, key, DerivedKind.REG, "series")
    ds.SeriesNumber = series_number(options, DerivedKind.REG)
    ds.SeriesDescription = fit_lo(
        ("CHECK REG! " if options.warnings else "") + "MR to CT rigid registration"
    )
    ds.InstanceNumber = 1
    ds.ContentDate = dicom_date(when)
    ds.ContentTime = dicom_time(when)
    ds.ContentLabel = "MR_TO_CT"
    ds.ContentDescription = fit_lo("Rigid registration of the MR onto the planning CT")
    ds.ContentCreatorName = ""
    text = comment or (
        "CHECK: " + options.warnings[0]
        if options.warnings
        else "MR patient coords to CT patient coords"
    )
    ds.RegistrationSequence = DicomSequence(
        [_registration_item(ct, np.eye(4), None), _registration_item(mr, matrix, text)]
    )
    add_common_instance_reference(
        ds,
        ct.study_uid,
        [(ct.study_uid, ct.series_uid, ct.instances), (mr.study_uid, mr.series_uid, mr.instances)],
    )
    return ds
