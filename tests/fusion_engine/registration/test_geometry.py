"""The DICOM REG matrix direction, resampling onto the CT grid, input checks, and the layout
of the registration package (public names kept, no import cycle with ``fusion_engine.errors``;
sizes are checked for every package by tests/test_structure.py)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fusion_engine.errors import InputError
from fusion_engine.registration import reg_matrix_mr_to_ct, register, resample_to
from tests.fusion_engine.registration import cases as rc

PACKAGE = Path(__file__).resolve().parents[3] / "fusion_engine" / "registration"


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


def test_register_rejects_bad_input() -> None:
    img2d = sitk.Image([32, 32], sitk.sitkFloat32)
    img3d = sitk.Image([32, 32, 32], sitk.sitkFloat32)
    with pytest.raises(InputError):
        register(img2d, img3d)
    with pytest.raises(InputError):
        register(img3d, img3d, threads=0)


# ----------------------------------------------------------------------------- package layout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_errors_module_does_not_import_registration() -> None:
    """errors.py is the bottom of the engine: no cycle with the registration package."""
    errors = PACKAGE.parent / "errors.py"
    assert not [m for m in _imports(errors) if m.startswith("fusion_engine")]


def test_public_api_is_kept() -> None:
    """``fusion_engine.register`` etc. and ``from fusion_engine.registration import ...``."""
    import fusion_engine

    registration = importlib.import_module("fusion_engine.registration")
    for name in (
        "register",
        "resample_to",
        "reg_matrix_mr_to_ct",
        "RegistrationResult",
        "RegistrationQuality",
        "check_transform",
    ):
        assert getattr(fusion_engine, name) is getattr(registration, name)
