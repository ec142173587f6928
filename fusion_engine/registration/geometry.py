"""Affine helpers of the registration, and the one MR <-> CT matrix conversion.

Conventions: a *pose* ``y = R @ x + offset`` is a 3x3 matrix and a 3-vector in patient
coordinates (LPS, mm). ITK transforms used for resampling map fixed (CT) points onto moving
(MR) points; :func:`reg_matrix_mr_to_ct` is the only place that turns one into the DICOM Frame of
Reference Transformation Matrix, which maps the other way.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from fusion_engine.errors import InputError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_FAR_POINTS = ((137.0, -251.0, 89.0), (-300.0, 40.0, -170.0), (55.5, 310.0, 420.0))
"""Points far from the origin on which a transform is checked to act like its matrix."""


def direction(image: sitk.Image) -> FloatArray:
    """The image's direction cosines as a 3x3 matrix (columns: the index axes)."""
    return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def index_to_physical(image: sitk.Image) -> tuple[FloatArray, FloatArray]:
    """Matrix A and offset o with physical = A @ (i, j, k) + o (ITK index order x, y, z)."""
    a = direction(image) @ np.diag(np.array(image.GetSpacing(), dtype=np.float64))
    return a, np.array(image.GetOrigin(), dtype=np.float64)


def affine_of(transform: sitk.Transform) -> tuple[FloatArray, FloatArray]:
    """Matrix A and offset b with transform(x) = A @ x + b, checked to be affine."""
    if not isinstance(transform, sitk.Transform) or transform.GetDimension() != 3:
        raise InputError("expected a 3-D SimpleITK transform")
    if not transform.IsLinear():
        raise InputError(
            f"transform {transform.GetName()} is not affine; no DICOM REG matrix exists"
        )
    basis = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    try:
        mapped = [np.array(transform.TransformPoint(p), dtype=np.float64) for p in basis]
    except RuntimeError as exc:
        raise InputError(f"transform cannot map 3-D points: {exc}") from exc
    b = mapped[0]
    a = np.stack([mapped[i] - b for i in (1, 2, 3)], axis=1)
    # An affine transform maps any point like the matrix does: check a few far points.
    for p in _FAR_POINTS:
        got = np.array(transform.TransformPoint(p), dtype=np.float64)
        want = a @ np.array(p) + b
        if not np.allclose(got, want, atol=1e-4 * (1.0 + float(np.abs(want).max()))):
            raise InputError(
                f"transform {transform.GetName()} is not affine; no DICOM REG matrix exists"
            )
    return a, b


def orthonormalize(matrix: FloatArray) -> FloatArray:
    """The proper rotation closest to ``matrix`` (SVD)."""
    u, _, vt = np.linalg.svd(matrix)
    r: FloatArray = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1.0
        r = u @ vt
    return r


def rigid(matrix: FloatArray, center: FloatArray, translation: FloatArray) -> sitk.Transform:
    """VersorRigid3DTransform x -> R (x - c) + c + t."""
    tr = sitk.VersorRigid3DTransform()
    tr.SetCenter([float(v) for v in center])
    tr.SetMatrix([float(v) for v in orthonormalize(matrix).ravel()])
    tr.SetTranslation([float(v) for v in translation])
    return tr


def rotation_angle_deg(matrix: FloatArray) -> float:
    """Rotation angle (degrees) of the rotation closest to ``matrix``."""
    r = orthonormalize(matrix)
    cos = (float(np.trace(r)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def axis_name(matrix: FloatArray) -> str:
    """Patient axis (LPS) closest to the rotation axis of ``matrix``."""
    values, vectors = np.linalg.eig(orthonormalize(matrix))
    axis = np.real(vectors[:, int(np.argmin(np.abs(values - 1.0)))])
    return ("left-right", "anterior-posterior", "head-feet")[int(np.argmax(np.abs(axis)))]


def rotation_about(axis: FloatArray, degrees: float) -> FloatArray:
    """Rotation by ``degrees`` about the unit vector ``axis`` (Rodrigues)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    t = math.radians(degrees)
    out: FloatArray = np.eye(3) + math.sin(t) * k + (1.0 - math.cos(t)) * (k @ k)
    return out


def cube_rotations() -> list[FloatArray]:
    """The 24 proper rotations that map coordinate axes onto coordinate axes."""
    out: list[FloatArray] = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            for row, (col, sign) in enumerate(zip(perm, signs, strict=True)):
                m[row, col] = sign
            if np.linalg.det(m) > 0:
                out.append(m)
    return out


def reg_matrix_mr_to_ct(transform: sitk.Transform) -> FloatArray:
    """4x4 DICOM Frame of Reference Transformation Matrix: MR patient coords -> CT coords.

    ``transform`` is ITK's fixed-to-moving map (CT point -> MR point), so the DICOM matrix
    (PS3.3 C.20.2, which maps the registered series' coordinates into the reference frame) is
    its inverse. This is the only place in the project where the direction is converted.
    """
    a, b = affine_of(transform)
    forward = np.eye(4)
    forward[:3, :3] = a
    forward[:3, 3] = b
    if abs(np.linalg.det(a)) < 1e-9:
        raise InputError("transform is singular; it has no inverse")
    inverse = np.linalg.inv(forward).astype(np.float64)
    inverse[3] = (0.0, 0.0, 0.0, 1.0)
    out: FloatArray = inverse
    return out
