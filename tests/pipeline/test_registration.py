"""Rigid MR -> CT registration, resampling and the DICOM REG matrix direction.

Registration tests run on small volumes (128 x 128 in-plane): the committed fixtures
``tests/fixtures/mridir_small`` when present, else the full MRI-DIR pair downsampled in the test
(skipped when ``../shared/data`` is absent). The TRE threshold of the known-transform cases on
those volumes is 1.0 mm, about 2/3 of the fixtures' 1.56 mm in-plane voxel (CT slices 3.7 mm;
measured TRE ~0.3 mm).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fusion_engine.errors import InputError, RegistrationError
from fusion_engine.registration import (
    WARN_ANGLE_DEG,
    RegistrationResult,
    reg_matrix_mr_to_ct,
    register,
    resample_to,
)
from tests.peers import FIXTURES, MRIDIR, require_full_data
from tests.pipeline import registration_cases as rc

SMALL = FIXTURES / "mridir_small"
TRE_LIMIT_MM = 1.0
THREADS = 2


def _small_pair() -> tuple[sitk.Image, sitk.Image]:
    if (SMALL / "ct").is_dir() and (SMALL / "mr").is_dir():
        return rc.read_series(SMALL / "ct"), rc.read_series(SMALL / "mr")
    require_full_data(MRIDIR)
    ct = rc.read_series(MRIDIR / "ct")
    mr = rc.read_series(MRIDIR / "mr")
    # Same conventions as the fixtures: 128 x 128 in-plane, fewer CT slices.
    return sitk.BinShrink(ct, [4, 4, 2]), sitk.BinShrink(mr, [4, 4, 1])


@pytest.fixture(scope="module")
def pair() -> tuple[sitk.Image, sitk.Image]:
    """Small MRI-DIR CT and MR (the CT in HU)."""
    ct, mr = _small_pair()
    return sitk.Cast(ct, sitk.sitkFloat32), sitk.Cast(mr, sitk.sitkFloat32)


def _pseudo_case(ct: sitk.Image, truth: sitk.Transform, seed: int) -> sitk.Image:
    center = np.array(truth.TransformPoint(rc.box_center(ct)))
    grid = rc.mr_like_grid(center, (2.0, 2.0, 2.5), (256.0, 256.0, 220.0))
    return rc.pseudo_mr(ct, truth, grid, seed=seed)


# ----------------------------------------------------------------------------- REG matrix


def _homogeneous(p: tuple[float, float, float]) -> np.ndarray:
    return np.array([*p, 1.0])


def test_reg_matrix_pure_translation_explicit_points() -> None:
    # ITK: CT point x maps to MR point x + (10, -5, 2). So MR (10, -5, 2) is CT (0, 0, 0).
    tr = sitk.TranslationTransform(3, (10.0, -5.0, 2.0))
    m = reg_matrix_mr_to_ct(tr)
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m @ _homogeneous((10.0, -5.0, 2.0)), [0.0, 0.0, 0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(
        m @ _homogeneous((0.0, 0.0, 0.0)), [-10.0, 5.0, -2.0, 1.0], atol=1e-9
    )
    np.testing.assert_allclose(m[3], [0.0, 0.0, 0.0, 1.0])


def test_reg_matrix_rotation_explicit_points() -> None:
    # ITK: 90 degrees about +z around (100, 0, 0) sends CT (110, 0, 0) to MR (100, 10, 0).
    tr = rc.rigid((0.0, 0.0, 90.0), (0.0, 0.0, 0.0), (100.0, 0.0, 0.0))
    np.testing.assert_allclose(tr.TransformPoint((110.0, 0.0, 0.0)), (100.0, 10.0, 0.0), atol=1e-9)
    m = reg_matrix_mr_to_ct(tr)
    np.testing.assert_allclose(
        m @ _homogeneous((100.0, 10.0, 0.0)), [110.0, 0.0, 0.0, 1.0], atol=1e-9
    )
    np.testing.assert_allclose(
        m @ _homogeneous((100.0, 0.0, 7.0)), [100.0, 0.0, 7.0, 1.0], atol=1e-9
    )
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("kind", ["euler", "versor", "composite", "affine"])
def test_reg_matrix_inverts_itk_transform_on_points(kind: str) -> None:
    euler = rc.rigid((12.0, -25.0, 160.0), (31.0, -7.5, 12.0), (-20.0, 15.0, 40.0))
    if kind == "euler":
        tr: sitk.Transform = euler
    elif kind == "versor":
        tr = sitk.VersorRigid3DTransform()
        tr.SetCenter(euler.GetCenter())
        tr.SetMatrix(euler.GetMatrix())
        tr.SetTranslation(euler.GetTranslation())
    elif kind == "composite":
        tr = rc.compose(euler, sitk.TranslationTransform(3, (1.0, 2.0, 3.0)))
    else:
        tr = sitk.AffineTransform(euler.GetMatrix(), euler.GetTranslation(), euler.GetCenter())
    m = reg_matrix_mr_to_ct(tr)
    rng = np.random.default_rng(4)
    for ct_point in rng.uniform(-200.0, 200.0, size=(20, 3)):
        mr_point = tr.TransformPoint([float(v) for v in ct_point])
        np.testing.assert_allclose(m @ _homogeneous(mr_point), [*ct_point, 1.0], atol=1e-6)


def test_reg_matrix_rejects_non_affine_transform() -> None:
    field = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)
    arr = sitk.GetArrayFromImage(field)
    arr[4, 4, 4] = (3.0, 0.0, 0.0)
    disp = sitk.GetImageFromArray(arr, isVector=True)
    tr = sitk.DisplacementFieldTransform(disp)
    with pytest.raises(InputError):
        reg_matrix_mr_to_ct(tr)


# ----------------------------------------------------------------------------- resampling


def _ramp_image() -> sitk.Image:
    """20 x 30 x 10 image, spacing (2, 1, 3), value = physical x + 2 * physical z."""
    img = sitk.Image([20, 30, 10], sitk.sitkFloat32)
    img.SetSpacing((2.0, 1.0, 3.0))
    img.SetOrigin((5.0, -10.0, 0.0))
    z, _, x = np.meshgrid(np.arange(10), np.arange(30), np.arange(20), indexing="ij")
    arr = (5.0 + 2.0 * x) + 2.0 * (3.0 * z)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    return out


@pytest.mark.parametrize("interpolator", ["linear", "bspline"])
def test_resample_values_and_mask(interpolator: str) -> None:
    moving = _ramp_image()
    fixed = sitk.Image([40, 40, 40], sitk.sitkInt16)
    fixed.SetSpacing((1.0, 1.0, 1.0))
    fixed.SetOrigin((0.0, -20.0, -5.0))
    shift = (7.0, 0.0, 4.0)
    tr = sitk.TranslationTransform(3, shift)  # fixed point x -> moving point x + shift
    out, mask = resample_to(fixed, moving, tr, interpolator=interpolator, default=-5.0)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert mask.GetPixelID() == sitk.sitkUInt8
    for img in (out, mask):
        assert img.GetSize() == fixed.GetSize()
        assert img.GetOrigin() == fixed.GetOrigin()
        assert img.GetSpacing() == fixed.GetSpacing()
    z, y, x = np.meshgrid(*(np.arange(40.0),) * 3, indexing="ij")
    mx, my, mz = x + 0.0 + shift[0], y - 20.0 + shift[1], z - 5.0 + shift[2]
    # Moving data covers its voxel centres +- half a voxel.
    lo = np.array([5.0 - 1.0, -10.0 - 0.5, 0.0 - 1.5])
    hi = np.array([5.0 + 19 * 2.0 + 1.0, -10.0 + 29 + 0.5, 27.0 + 1.5])
    inside = (mx > lo[0]) & (mx < hi[0]) & (my > lo[1]) & (my < hi[1]) & (mz > lo[2]) & (mz < hi[2])
    m = sitk.GetArrayFromImage(mask)
    assert set(np.unique(m)) <= {0, 1}
    strict = (mx > lo[0] + 0.01) & (mx < hi[0] - 0.01) & (my > lo[1] + 0.01)
    strict &= (my < hi[1] - 0.01) & (mz > lo[2] + 0.01) & (mz < hi[2] - 0.01)
    assert np.all(m[strict] == 1)
    assert np.all(m[~inside] == 0)
    v = sitk.GetArrayFromImage(out)
    assert np.all(v[m == 0] == -5.0)
    # Away from the edges both interpolators reproduce the linear ramp (B-spline's mirror
    # boundary condition bends it within a few voxels of the edge).
    if interpolator == "linear":
        core = (mx > 8.0) & (mx < 40.0) & (my > -8.0) & (my < 17.0) & (mz > 4.0) & (mz < 23.0)
        tol = 1e-3
    else:
        core = (mx > 14.0) & (mx < 34.0) & (my > -4.0) & (my < 13.0) & (mz > 10.0) & (mz < 17.0)
        tol = 0.02
    assert core.sum() > 100
    np.testing.assert_allclose(v[core], (mx + 2.0 * mz)[core], atol=tol)


def test_resample_rejects_unknown_interpolator() -> None:
    img = _ramp_image()
    with pytest.raises(InputError):
        resample_to(img, img, sitk.Transform(3, sitk.sitkIdentity), interpolator="cubic")


# ----------------------------------------------------------------------------- register


def test_register_rejects_2d_input() -> None:
    img2d = sitk.Image([32, 32], sitk.sitkFloat32)
    img3d = sitk.Image([32, 32, 32], sitk.sitkFloat32)
    with pytest.raises(InputError):
        register(img2d, img3d)
    with pytest.raises(InputError):
        register(img3d, img3d, threads=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("angles", "shift"),
    [((12.0, -8.0, 14.0), (22.0, -15.0, 12.0)), ((-20.0, 10.0, 0.0), (-10.0, 25.0, -14.0))],
)
def test_known_transform_recovered(
    pair: tuple[sitk.Image, sitk.Image],
    angles: tuple[float, float, float],
    shift: tuple[float, float, float],
) -> None:
    ct, _ = pair
    truth = rc.rigid(angles, shift, rc.box_center(ct))
    moving = _pseudo_case(ct, truth, seed=1)
    result = register(ct, moving, threads=THREADS)
    tre = rc.tre_mm(result.transform, truth, rc.head_box_corners(ct))
    assert tre <= TRE_LIMIT_MM, f"TRE {tre:.2f} mm"
    q = result.quality
    assert q.mask_dice > 0.9
    assert q.metric_value < 0
    assert q.iterations > 0
    assert q.seconds > 0
    assert q.angle_from_header_deg < WARN_ANGLE_DEG
    assert q.warnings == []


@pytest.mark.slow
def test_flipped_pseudo_mr_is_recovered_with_warning(pair: tuple[sitk.Image, sitk.Image]) -> None:
    """Feet-first vs head-first that the headers do not describe: ~180 degrees about A-P."""
    ct, _ = pair
    center = rc.box_center(ct)
    truth = rc.compose(
        rc.flip_about_y(center), rc.rigid((5.0, 0.0, -8.0), (6.0, 10.0, -20.0), center)
    )
    moving = _pseudo_case(ct, truth, seed=2)
    result = register(ct, moving, threads=THREADS)
    tre = rc.tre_mm(result.transform, truth, rc.head_box_corners(ct))
    assert tre <= TRE_LIMIT_MM, f"TRE {tre:.2f} mm"
    assert result.quality.angle_from_header_deg > 150.0
    assert any("anterior-posterior" in w for w in result.quality.warnings)


@pytest.mark.slow
def test_mr_slab_through_part_of_the_head_is_found(pair: tuple[sitk.Image, sitk.Image]) -> None:
    """A 120 mm MR slab over the upper head: mask centres differ, the search slides the slab.

    TRE is taken at the corners of the whole head's box, far outside the slab, hence 2 mm.
    """
    ct, _ = pair
    center = rc.box_center(ct)
    truth = rc.rigid((8.0, -12.0, 6.0), (15.0, -10.0, 20.0), center)
    slab_center = np.array(truth.TransformPoint(center)) + np.array([0.0, 0.0, 50.0])
    grid = rc.mr_like_grid(slab_center, (2.0, 2.0, 4.0), (240.0, 240.0, 120.0))
    moving = rc.pseudo_mr(ct, truth, grid, seed=3)
    result = register(ct, moving, threads=THREADS)
    tre = rc.tre_mm(result.transform, truth, rc.head_box_corners(ct))
    assert tre <= 2.0, f"TRE {tre:.2f} mm"


@pytest.mark.slow
def test_mridir_pair_is_turned_about_180_degrees(pair: tuple[sitk.Image, sitk.Image]) -> None:
    """The real pair: CT header says feet-first, MR head-first, phantom lay the same way."""
    ct, mr = pair
    result = register(ct, mr, threads=THREADS)
    q = result.quality
    assert 165.0 < q.angle_from_header_deg <= 180.0
    assert any("anterior-posterior" in w for w in q.warnings), q.warnings
    assert q.mask_dice > 0.9
    # The turn is about the anterior-posterior (y) axis: x and z flip, y stays.
    m = reg_matrix_mr_to_ct(result.transform)
    diag = np.diag(m[:3, :3])
    assert diag[0] < -0.95 and diag[1] > 0.95 and diag[2] < -0.95
    # The registered MR covers the CT head.
    _, mask = resample_to(ct, mr, result.transform)
    assert sitk.GetArrayViewFromImage(mask).mean() > 0.3


@pytest.mark.slow
def test_noise_mr_is_unreliable(pair: tuple[sitk.Image, sitk.Image]) -> None:
    ct, _ = pair
    grid = rc.mr_like_grid(np.array(rc.box_center(ct)), (4.0, 4.0, 5.0), (256.0, 256.0, 220.0))
    shape = sitk.GetArrayViewFromImage(grid).shape
    arr = np.random.default_rng(0).normal(100.0, 20.0, shape).astype(np.float32)
    noise = sitk.GetImageFromArray(arr)
    noise.CopyInformation(grid)
    with pytest.raises(RegistrationError) as info:
        register(ct, noise, threads=THREADS)
    quality = info.value.quality
    assert quality is not None
    assert "unreliable" in str(info.value)
    accepted = register(ct, noise, threads=THREADS, accept_unreliable=True)
    assert isinstance(accepted, RegistrationResult)
    assert any("unreliable" in w for w in accepted.quality.warnings)


def test_constant_mr_cannot_register(pair: tuple[sitk.Image, sitk.Image]) -> None:
    ct, mr = pair
    flat = sitk.Image(mr.GetSize(), sitk.sitkFloat32)
    flat.CopyInformation(mr)
    with pytest.raises(RegistrationError):
        register(ct, flat, threads=THREADS)
