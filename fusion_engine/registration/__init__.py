"""Rigid MR -> CT registration, its reliability check, resampling and the DICOM REG matrix.

The CT is the fixed image, the MR the moving one. A result's ``transform`` is an ITK rigid
transform that maps CT (fixed) points onto MR (moving) points, the convention ``sitk.Resample``
expects; :func:`reg_matrix_mr_to_ct` is the one place that turns it into the DICOM Frame of
Reference Transformation Matrix, which maps the other way. See ``docs/registration.md``.

Modules: :mod:`.geometry` (affine helpers, the matrix conversion), :mod:`.images` (pyramid,
resampling), :mod:`.masks`, :mod:`.pair` (the prepared pair), :mod:`.similarity` (the metric),
:mod:`.search` (global search), :mod:`.refine` (local refinement), :mod:`.quality` (the
reliability check), :mod:`.api` (the entry points).
"""

from __future__ import annotations

from fusion_engine.registration.api import (
    RegistrationResult,
    check_transform,
    register,
)
from fusion_engine.registration.geometry import affine_of, reg_matrix_mr_to_ct
from fusion_engine.registration.images import resample_to
from fusion_engine.registration.quality import WARN_ANGLE_DEG, Check, RegistrationQuality

__all__ = [
    "WARN_ANGLE_DEG",
    "Check",
    "RegistrationQuality",
    "RegistrationResult",
    "affine_of",
    "check_transform",
    "reg_matrix_mr_to_ct",
    "register",
    "resample_to",
]
