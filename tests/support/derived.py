"""Derived objects of the small fixture pair made without registration or the network."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.imaging import derive
from dicom_node.imaging.pipeline import mr_slices_per_ct_slice
from dicom_node.imaging.volumes import SeriesVolume
from fusion_engine.intensity import ct_to_unit

PLANE_KEYWORDS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
)


def options(**overrides: object) -> derive.DeriveOptions:
    """Derive options of the default config with a test salt (``overrides`` replace fields)."""
    opts = derive.DeriveOptions.from_config(NodeConfig(), salt="test")
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


@dataclass
class IdentityOutputs:
    """Derived objects made with an identity transform and a CT-window 'fusion'."""

    ct: SeriesVolume
    mr: SeriesVolume
    mr_on_ct: sitk.Image
    mask: sitk.Image
    fused: sitk.Image
    mr_slices: list[list[int]]
    fused_ds: list[Dataset]
    registered_ds: list[Dataset]
    reg_ds: Dataset
    options: derive.DeriveOptions


def identity_outputs(ct: SeriesVolume, mr: SeriesVolume) -> IdentityOutputs:
    """Derive all three kinds on a pair without registration (identity transform)."""
    from fusion_engine.registration import resample_to

    transform = sitk.Euler3DTransform()
    mr_on_ct, mask = resample_to(ct.image, mr.image, transform)
    unit = ct_to_unit(sitk.GetArrayViewFromImage(ct.image))
    mr_arr = sitk.GetArrayViewFromImage(mr_on_ct)
    mixed = np.where(
        sitk.GetArrayViewFromImage(mask) > 0,
        0.5 * unit + 0.5 * np.clip(mr_arr / max(float(mr_arr.max()), 1.0), 0, 1),
        unit,
    ).astype(np.float32)
    fused = sitk.GetImageFromArray(mixed)
    fused.CopyInformation(ct.image)
    mr_slices = mr_slices_per_ct_slice(ct, mr, transform, mask)
    opts = options(created=dt.datetime(2026, 12, 1, 12, 0, 0))
    fused_ds = derive.fused_series(
        ct,
        mr,
        fused,
        mr_slices=mr_slices,
        model_version="test-model",
        strategy="test",
        options=opts,
    )
    return IdentityOutputs(
        ct=ct,
        mr=mr,
        mr_on_ct=mr_on_ct,
        mask=mask,
        fused=fused,
        mr_slices=mr_slices,
        fused_ds=fused_ds,
        registered_ds=derive.registered_mr_series(
            ct, mr, mr_on_ct, mr_slices=mr_slices, options=opts
        ),
        reg_ds=derive.spatial_registration(ct, mr, np.eye(4), options=opts),
        options=opts,
    )


def assert_same_plane(ds: Dataset, ref: Dataset, label: object) -> None:
    """``ds`` carries exactly the image-plane attributes of ``ref`` (as stored strings)."""
    for kw in PLANE_KEYWORDS:
        assert [str(v) for v in np.atleast_1d(ds[kw].value)] == [
            str(v) for v in np.atleast_1d(ref[kw].value)
        ], (label, kw)


def reg_matrix(reg: Dataset, item: int) -> npt.NDArray[np.float64]:
    """The 4x4 Frame of Reference Transformation Matrix of RegistrationSequence[item]."""
    seq = reg.RegistrationSequence[item].MatrixRegistrationSequence[0].MatrixSequence[0]
    return np.array([float(v) for v in seq.FrameOfReferenceTransformationMatrix]).reshape(4, 4)
