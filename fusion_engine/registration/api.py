"""The entry points: ``register`` (search, refine, check) and ``check_transform`` (the check
alone)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from fusion_engine.errors import InputError, UnreliableRegistrationError
from fusion_engine.registration import geometry as geo
from fusion_engine.registration import masks
from fusion_engine.registration.geometry import FloatArray
from fusion_engine.registration.images import Filters, validate
from fusion_engine.registration.pair import FINAL_LEVEL, Pair, prepare
from fusion_engine.registration.quality import WARN_ANGLE_DEG, RegistrationQuality, evaluate
from fusion_engine.registration.refine import refine_candidates
from fusion_engine.registration.search import search
from fusion_engine.registration.similarity import Poses

log = logging.getLogger(__name__)

Pose = tuple[FloatArray, FloatArray]


@dataclass
class RegistrationResult:
    """A rigid transform mapping CT (fixed) points to MR (moving) points, and its quality."""

    transform: sitk.Transform
    quality: RegistrationQuality


def to_transform(pose: Pose, center: FloatArray) -> sitk.Transform:
    """The CT -> MR ITK transform of a (proper) MR -> CT pose, centred at ``center`` (CT)."""
    inv: FloatArray = np.linalg.inv(pose[0]).astype(np.float64)
    return geo.rigid(inv, center, inv @ (center - pose[1]) - center)


def to_pose(transform: sitk.Transform) -> Pose:
    """The MR -> CT pose of a CT -> MR affine transform."""
    a, b = geo.affine_of(transform)
    if abs(float(np.linalg.det(a))) < 1e-9:
        raise InputError("transform is singular; it has no inverse")
    inv: FloatArray = np.linalg.inv(a).astype(np.float64)
    return inv, -inv @ b


def prepare_pair(ct: sitk.Image, mr: sitk.Image, threads: int | None = None) -> Pair:
    """Check the inputs and prepare them (pyramids, masks) for :func:`check_pair`."""
    validate(ct, "fixed CT")
    validate(mr, "moving MR")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    return prepare(ct, mr, Filters(threads))


def _quality(
    pair: Pair, pose: Pose, value: float, iterations: int, started: float
) -> RegistrationQuality:
    """Run the reliability check and collect the figures of ``pose``."""
    transform = to_transform(pose, pair.ct_center)
    dice, overlap = masks.mask_dice(pair.ct_mask, pair.mr_mask, transform, pair.filters)
    checks = evaluate(pair, pose)
    angle = geo.rotation_angle_deg(pose[0])
    quality = RegistrationQuality(
        metric_value=-value,
        mask_dice=dice,
        iterations=iterations,
        seconds=time.perf_counter() - started,
        angle_from_header_deg=angle,
        checks=checks,
        overlap=overlap,
    )
    quality.warnings.extend(c.warning for c in checks if c.warning)
    if angle > WARN_ANGLE_DEG:
        quality.warnings.append(
            f"MR turned {angle:.0f} degrees about the {geo.axis_name(pose[0])} axis against "
            "what the DICOM headers imply (patient position entered wrongly, e.g. feet-first "
            "vs head-first?): verify the fusion before use"
        )
    return quality


def _decide(quality: RegistrationQuality, accept_unreliable: bool) -> None:
    """Raise when unreliable, unless accepted (then the reasons become warnings)."""
    if quality.reliable:
        return
    message = "registration unreliable: " + "; ".join(quality.reasons)
    if not accept_unreliable:
        raise UnreliableRegistrationError(message, quality=quality)
    quality.warnings.append(message)


def register(
    fixed_ct: sitk.Image,
    moving_mr: sitk.Image,
    *,
    threads: int | None = None,
    accept_unreliable: bool = False,
) -> RegistrationResult:
    """Rigidly register the MR (moving) onto the CT (fixed).

    Returns the transform (CT points -> MR points, ITK convention) and its quality. Raises
    :class:`~fusion_engine.errors.UnreliableRegistrationError` (with ``.quality``) when the
    reliability check fails, unless ``accept_unreliable`` is true, in which case the reasons
    are added to the warnings. Raises :class:`~fusion_engine.errors.RegistrationError` when
    there is nothing to register (e.g. a constant image). ``threads`` bounds the SimpleITK
    threads (``None``: SimpleITK's default).
    """
    t0 = time.perf_counter()
    pair = prepare_pair(fixed_ct, moving_mr, threads)
    t_prep = time.perf_counter()
    candidates = search(pair)
    t_search = time.perf_counter()
    best = refine_candidates(pair, [(c.value, c.matrix, c.offset) for c in candidates])
    t_refine = time.perf_counter()
    pose = (best.matrix, best.offset)
    quality = _quality(pair, pose, best.value, best.iterations, t0)
    log.info(
        "registration: metric %.4f, %s, mask Dice %.3f, %.1f s (prepare %.1f, search %.1f, "
        "refine %.1f, check %.1f), %.1f deg from header",
        quality.metric_value,
        quality.summary(),
        quality.mask_dice,
        quality.seconds,
        t_prep - t0,
        t_search - t_prep,
        t_refine - t_search,
        time.perf_counter() - t_refine,
        quality.angle_from_header_deg,
    )
    result = RegistrationResult(to_transform(pose, pair.ct_center), quality)
    _decide(quality, accept_unreliable)
    return result


def check_transform(
    fixed_ct: sitk.Image,
    moving_mr: sitk.Image,
    transform: sitk.Transform,
    *,
    threads: int | None = None,
) -> RegistrationQuality:
    """The reliability check of a given rigid ``transform`` (CT point -> MR point), e.g. one
    made elsewhere or edited by hand; never raises for an unreliable one (see ``.reliable``)."""
    return check_pair(prepare_pair(fixed_ct, moving_mr, threads), transform)


def check_pair(pair: Pair, transform: sitk.Transform) -> RegistrationQuality:
    """:func:`check_transform` on a pair from :func:`prepare_pair` (reused across checks)."""
    t0 = time.perf_counter()
    pose = to_pose(transform)
    value = float(pair.level_similarity(FINAL_LEVEL).evaluate(Poses.of([pose]))[0][0])
    return _quality(pair, pose, value, 0, t0)
