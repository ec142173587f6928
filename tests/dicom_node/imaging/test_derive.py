"""derive: geometry per instance, references, Frames of Reference, REG matrix, UIDs, dciodvfy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from dicom_node.errors import DeriveError
from dicom_node.imaging import derive
from tests.peers.dciodvfy import dciodvfy_errors
from tests.support.data import read_back
from tests.support.derived import IdentityOutputs, assert_same_plane, options, reg_matrix

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _images(out: IdentityOutputs) -> list[tuple[str, list[Dataset]]]:
    return [("fused", out.fused_ds), ("registered_mr", out.registered_ds)]


def test_one_instance_per_ct_slice_with_ct_geometry(identity_outputs: IdentityOutputs) -> None:
    out = identity_outputs
    for kind, series in _images(out):
        assert len(series) == len(out.ct.datasets), kind
        for ds, ct_ds in zip(series, out.ct.datasets, strict=True):
            assert_same_plane(ds, ct_ds, kind)
            assert (ds.Rows, ds.Columns) == (ct_ds.Rows, ct_ds.Columns)
            assert ds.StudyInstanceUID == ct_ds.StudyInstanceUID
            assert ds.FrameOfReferenceUID == ct_ds.FrameOfReferenceUID
            assert ds.PatientID == ct_ds.PatientID
            assert ds.PatientName == ct_ds.PatientName
            assert ds.SOPClassUID == MRImageStorage != CTImageStorage
            assert ds.Modality == "MR"
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        uids = {ds.SeriesInstanceUID for ds in series}
        assert len(uids) == 1 and uids.isdisjoint({out.ct.series_uid, out.mr.series_uid})
        assert len({ds.SOPInstanceUID for ds in series}) == len(series)
        assert [int(ds.InstanceNumber) for ds in series] == list(range(1, len(series) + 1))


def test_fused_description_and_derivation(identity_outputs: IdentityOutputs) -> None:
    ds = identity_outputs.fused_ds[0]
    assert len(ds.SeriesDescription) <= 64
    assert "not for dose calculation" in ds.SeriesDescription
    assert "fusion" in ds.SeriesDescription.lower()
    assert "CT only outside MR" in ds.SeriesDescription
    assert "test-model" in ds.DerivationDescription
    assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.PixelRepresentation == 0
    center, width = (float(v) for v in (ds.WindowCenter[0], ds.WindowWidth[0]))
    assert 0 < center < 4095 and 1 < width <= 4096
    reg_mr = identity_outputs.registered_ds[0]
    assert "not for dose calculation" in reg_mr.SeriesDescription
    assert len(reg_mr.SeriesDescription) <= 64


def test_warning_in_descriptions(identity_outputs: IdentityOutputs) -> None:
    out = identity_outputs
    opts = options(warnings=["registration rotates the MR by 178 degrees"])
    fused = derive.fused_series(out.ct, out.mr, out.fused, options=opts)
    reg_mr = derive.registered_mr_series(out.ct, out.mr, out.mr_on_ct, options=opts)
    reg = derive.spatial_registration(out.ct, out.mr, np.eye(4), options=opts)
    for ds in (fused[0], reg_mr[0], reg):
        assert ds.SeriesDescription.startswith("CHECK REG!")
        assert len(ds.SeriesDescription) <= 64
    assert "178 degrees" in fused[0].ImageComments
    assert "not for dose calculation" in fused[0].SeriesDescription


def test_pixels_round_trip(identity_outputs: IdentityOutputs, tmp_path: Path) -> None:
    out = identity_outputs
    fused = sitk.GetArrayViewFromImage(out.fused)
    mr = sitk.GetArrayViewFromImage(out.mr_on_ct)
    for k in (0, len(out.ct.datasets) // 2, len(out.ct.datasets) - 1):
        z = out.ct.slice_indices[k]
        got = read_back(out.fused_ds[k], tmp_path, "f.dcm").pixel_array
        np.testing.assert_array_equal(got, np.rint(np.clip(fused[z], 0, 1) * 4095))
        got_mr = read_back(out.registered_ds[k], tmp_path, "m.dcm").pixel_array
        np.testing.assert_allclose(got_mr, mr[z], atol=0.5)


def test_source_image_references(identity_outputs: IdentityOutputs) -> None:
    out = identity_outputs
    ct_uids = {str(d.SOPInstanceUID) for d in out.ct.datasets}
    mr_uids = {str(d.SOPInstanceUID) for d in out.mr.datasets}
    with_mr = 0
    for k, ds in enumerate(out.fused_ds):
        refs = [str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence]
        assert refs[0] == out.ct.datasets[k].SOPInstanceUID
        assert set(refs[1:]) <= mr_uids
        assert [str(out.mr.datasets[j].SOPInstanceUID) for j in out.mr_slices[k]] == refs[1:]
        with_mr += bool(refs[1:])
        item = ds.SourceImageSequence[0]
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        # Common Instance Reference: CT in this study, MR in another study.
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == out.ct.series_uid
        if refs[1:]:
            other = ds.StudiesContainingOtherReferencedInstancesSequence[0]
            assert other.StudyInstanceUID == out.mr.study_uid
            assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == out.mr.series_uid
    assert with_mr > 0
    for k, ds in enumerate(out.registered_ds):
        sources = {str(i.ReferencedSOPInstanceUID) for i in ds.get("SourceImageSequence", [])}
        assert sources <= mr_uids and sources.isdisjoint(ct_uids)
        assert len(sources) == len(out.mr_slices[k])


def test_mr_slices_cover_ct_slice_positions(identity_outputs: IdentityOutputs) -> None:
    """With the identity transform, CT slice z uses the MR slices around the same z."""
    out = identity_outputs
    mr_z = [float(d.ImagePositionPatient[2]) for d in out.mr.datasets]
    for k, ds in enumerate(out.ct.datasets):
        z = float(ds.ImagePositionPatient[2])
        used = out.mr_slices[k]
        if min(mr_z) <= z <= max(mr_z):
            assert used, k
            assert min(mr_z[j] for j in used) <= z + 1e-3
            assert max(mr_z[j] for j in used) >= z - 1e-3
            assert len(used) <= 4


def test_spatial_registration_object(identity_outputs: IdentityOutputs) -> None:
    out = identity_outputs
    reg = out.reg_ds
    assert reg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.1"
    assert reg.Modality == "REG"
    assert reg.FrameOfReferenceUID == out.ct.frame_of_reference_uid
    assert reg.StudyInstanceUID == out.ct.study_uid
    items = reg.RegistrationSequence
    assert [i.FrameOfReferenceUID for i in items] == [
        out.ct.frame_of_reference_uid,
        out.mr.frame_of_reference_uid,
    ]
    assert {str(r.ReferencedSOPInstanceUID) for r in items[0].ReferencedImageSequence} == {
        str(d.SOPInstanceUID) for d in out.ct.datasets
    }
    assert {str(r.ReferencedSOPInstanceUID) for r in items[1].ReferencedImageSequence} == {
        str(d.SOPInstanceUID) for d in out.mr.datasets
    }
    for item in items:
        m = item.MatrixRegistrationSequence[0].MatrixSequence[0]
        assert m.FrameOfReferenceTransformationMatrixType == "RIGID"
        assert len(m.FrameOfReferenceTransformationMatrix) == 16
    assert reg.ReferencedSeriesSequence[0].SeriesInstanceUID == out.ct.series_uid
    other = reg.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == out.mr.study_uid
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == out.mr.series_uid


def test_reg_matrix_maps_mr_points_onto_ct_points(
    identity_outputs: IdentityOutputs, tmp_path: Path
) -> None:
    """A known ITK transform (CT -> MR points) stored as DICOM maps MR points back onto CT."""
    from fusion_engine.registration import reg_matrix_mr_to_ct

    out = identity_outputs
    t = sitk.Euler3DTransform()
    t.SetCenter((0.0, -10.0, 20.0))
    t.SetRotation(np.radians(12.0), np.radians(-20.0), np.radians(175.0))
    t.SetTranslation((15.0, -30.0, 8.0))
    matrix = reg_matrix_mr_to_ct(t)
    reg = read_back(
        derive.spatial_registration(out.ct, out.mr, matrix, options=out.options),
        tmp_path,
        "reg.dcm",
    )
    stored = reg_matrix(reg, 1)
    identity = reg_matrix(reg, 0)
    np.testing.assert_allclose(identity, np.eye(4))
    rng = np.random.default_rng(7)
    for p_ct in rng.uniform(-100, 100, size=(20, 3)):
        q_mr = np.array(t.TransformPoint(tuple(p_ct)))
        back = stored @ np.append(q_mr, 1.0)
        np.testing.assert_allclose(back[:3], p_ct, atol=1e-4)


def test_bad_matrix_rejected(identity_outputs: IdentityOutputs) -> None:
    out = identity_outputs
    with pytest.raises(DeriveError, match="rigid"):
        derive.spatial_registration(
            out.ct, out.mr, np.diag([2.0, 1.0, 1.0, 1.0]), options=out.options
        )
    with pytest.raises(DeriveError, match="4x4"):
        derive.spatial_registration(out.ct, out.mr, np.eye(3), options=out.options)


def test_deterministic_uids_and_series_numbers(identity_outputs: IdentityOutputs) -> None:
    out = identity_outputs
    again = derive.fused_series(
        out.ct,
        out.mr,
        out.fused,
        mr_slices=out.mr_slices,
        model_version="test-model",
        strategy="test",
        options=options(salt="test"),
    )
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in out.fused_ds]
    other_model = derive.fused_series(
        out.ct,
        out.mr,
        out.fused,
        model_version="model 2",
        strategy="test",
        options=options(salt="test"),
    )
    assert other_model[0].SeriesInstanceUID != out.fused_ds[0].SeriesInstanceUID
    assert again[0].SeriesInstanceUID == out.fused_ds[0].SeriesInstanceUID
    assert again[0].SeriesNumber == out.fused_ds[0].SeriesNumber == 9001
    assert out.registered_ds[0].SeriesNumber == 9002 and out.reg_ds.SeriesNumber == 9003
    reg_again = derive.spatial_registration(out.ct, out.mr, np.eye(4), options=options(salt="test"))
    assert reg_again.SOPInstanceUID == out.reg_ds.SOPInstanceUID
    # A new revision or salt gives new UIDs; a revision also a new series number.
    rev = derive.fused_series(out.ct, out.mr, out.fused, options=options(salt="test", revision=1))
    assert rev[0].SeriesInstanceUID != out.fused_ds[0].SeriesInstanceUID
    assert rev[0].SOPInstanceUID != out.fused_ds[0].SOPInstanceUID
    assert rev[0].SeriesNumber == 9011
    salted = derive.fused_series(out.ct, out.mr, out.fused, options=options(salt="other"))
    assert salted[0].SeriesInstanceUID != out.fused_ds[0].SeriesInstanceUID
    # The three kinds never share UIDs.
    series = {
        out.fused_ds[0].SeriesInstanceUID,
        out.registered_ds[0].SeriesInstanceUID,
        out.reg_ds.SeriesInstanceUID,
    }
    assert len(series) == 3


def test_uid_roots() -> None:
    default = derive.derive_uid("2.25", "a", "b")
    assert default.startswith("2.25.") and UID_RE.match(default) and len(default) <= 64
    assert derive.derive_uid("2.25", "a", "b") == default != derive.derive_uid("2.25", "a", "c")
    custom = derive.derive_uid("1.2.826.0.1.3680043.10.999", "x")
    assert custom.startswith("1.2.826.0.1.3680043.10.999.") and len(custom) <= 64
    assert UID_RE.match(custom)
    for bad in ("", "1.2.x", "1." * 30):
        with pytest.raises(DeriveError):
            derive.derive_uid(bad, "x")


def test_all_uids_valid(identity_outputs: IdentityOutputs) -> None:
    out = identity_outputs
    for ds in (out.fused_ds[0], out.registered_ds[0], out.reg_ds):
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID):
            assert UID_RE.match(uid) and len(uid) <= 64


@pytest.mark.peers
def test_dciodvfy_clean(identity_outputs: IdentityOutputs, tmp_path: Path) -> None:
    out = identity_outputs
    no_mr = [k for k, used in enumerate(out.mr_slices) if not used]
    assert no_mr, "fixture CT reaches beyond the MR slab"
    objects = {
        "fused": out.fused_ds[len(out.fused_ds) // 2],
        "registered_mr": out.registered_ds[len(out.registered_ds) // 2],
        "reg": out.reg_ds,
        "fused_no_mr": out.fused_ds[no_mr[0]],
        "registered_mr_no_mr": out.registered_ds[no_mr[0]],
    }
    warned = options(warnings=["registration rotates the MR by 178 degrees"])
    objects["reg_warned"] = derive.spatial_registration(out.ct, out.mr, np.eye(4), options=warned)
    objects["fused_warned"] = derive.fused_series(out.ct, out.mr, out.fused, options=warned)[0]
    for name, ds in objects.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
