"""The reliability check: is the delivered pose the one the images support?

No decision rests on a threshold of a raw figure such as a mask Dice or a metric value: those
depend on the contrast, the noise and how much of the head the MR covers, so one threshold per
figure either misses failures or rejects good results. Every check compares the result with
alternatives *on the same pair of images*, or measures a disagreement in millimetres against the
accuracy the planner needs (AAPM TG-132: about 2 mm for rigid registration):

* ``optimum``: a fresh local search from the result, at full resolution, moves it by at most
  :data:`OPTIMUM_TOL_MM` (the metric is no better at any perturbed neighbour).
* ``starts``: searches started :data:`START_MM` mm / degrees away along each axis return to the
  result, or end at a pose that fits worse; no start finds a better pose elsewhere.
* ``mirror``: the best mirror-image (improper) pose, found by the same search, fits worse than
  the result. A left-right-flipped MR fits its mirror pose better, and no rigid transform can
  represent that; it must never be delivered.
* ``halves``: each half of the MR (split across its three axes), registered on its own from the
  result, agrees with the result to within :data:`HALVES_FAIL_MM` over its own voxels. A wrong
  subject, or a pose held by one region only, makes the halves disagree. Between
  :data:`HALVES_WARN_MM` and that limit the result is delivered with a warning: the pair is not
  one rigid body to better than that (MR distortion, a deformed phantom, another position).

A pose passing all four is *reliable*. The figures of every check, the head-mask Dice and the
angle from the header geometry are reported with it (and shown to the planner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fusion_engine.registration import geometry as geo
from fusion_engine.registration import search as global_search
from fusion_engine.registration.geometry import FloatArray
from fusion_engine.registration.masks import SEED
from fusion_engine.registration.pair import FINAL_LEVEL, Pair
from fusion_engine.registration.refine import FINAL_STEPS, local_search, newton_search, step_pose
from fusion_engine.registration.similarity import Poses

OPTIMUM_TOL_MM = 1.5
"""A local search from the result may move it this far (mean over the MR head) at most: three
times the spread of the optimum between independent sample sets on the real MRI-DIR pair."""

START_MM = 12.0
"""Distance (mm, and degrees for turns) of the independent starts from the result."""

AGREE_MM = 2.0
"""A start ending within this distance of the result agrees with it."""

HALVES_FAIL_MM = 5.0
"""A half of the MR that disagrees with the whole by more than this (mean over its voxels)
makes the result unreliable: 5 mm is the misregistration a planner must not miss."""

HALVES_WARN_MM = 2.0
"""A disagreement above this (TG-132's tolerance for rigid registration) is reported to the
planner as a warning: the pair differs non-rigidly, locally by about that much."""

CHECK_POINTS = 6000
"""MR samples (2 mm level) of the optimum, mirror and half checks."""

START_POINTS = 2500
"""MR samples (4 mm level) of the independent starts."""

MIRROR_CANDIDATES = 3
"""Mirror-image search candidates refined."""

WARN_ANGLE_DEG = 45.0
"""A result further than this from the header geometry gets a warning for the planner."""

BETTER_MARGIN = 1e-3
"""Relative metric margin (0.1 %) by which an alternative must beat the result to count."""


Pose = tuple[FloatArray, FloatArray]


@dataclass
class Check:
    """One piece of evidence: its figure, the limit it is held to and whether it passed;
    ``detail`` says what a failure means, ``warning`` what the planner should know even
    though it passed (empty when nothing)."""

    name: str
    passed: bool
    value: float
    limit: float
    unit: str
    detail: str
    warning: str = ""


@dataclass
class RegistrationQuality:
    """How good a registration looks; the node shows it and fails the job when unreliable.

    ``metric_value`` is minus the mutual information (nats) of the result at full resolution
    (lower is better, ITK's sign convention). ``mask_dice`` is the Dice overlap of the CT and
    MR head masks inside the MR's field of view and ``overlap`` the fraction of the CT head in
    that field of view (both for information). ``angle_from_header_deg`` is the rotation angle
    between the result and the identity the DICOM headers imply. ``checks`` holds the evidence
    of the reliability check; ``reliable`` is true when every check passed.
    """

    metric_value: float
    mask_dice: float
    iterations: int
    seconds: float
    angle_from_header_deg: float
    warnings: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    overlap: float = math.nan

    @property
    def reliable(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        """Why the result is unreliable (the details of the failed checks)."""
        return [c.detail for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line for descriptions and logs, e.g. ``"optimum 0.0 mm, starts 12/12, ..."``."""
        parts = [f"{c.name} {_short(c)}" for c in self.checks]
        return ", ".join(parts) if parts else "not checked"

    def to_dict(self) -> dict[str, object]:
        """The figures as flat JSON-ready data (job records, manifests, summaries): the fields,
        ``reliable``, ``evidence`` (:meth:`summary`), ``reasons`` and ``check_<name>`` values."""
        out: dict[str, object] = {
            "metric_value": self.metric_value,
            "mask_dice": self.mask_dice,
            "overlap": self.overlap,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "angle_from_header_deg": self.angle_from_header_deg,
            "reliable": self.reliable,
            "evidence": self.summary(),
            "reasons": self.reasons,
            "warnings": list(self.warnings),
        }
        out.update({f"check_{c.name}": c.value for c in self.checks})
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()
        }


def _short(check: Check) -> str:
    mark = "" if check.passed else " FAIL"
    if check.unit.startswith("/"):
        return f"{check.value:.0f}{check.unit}{mark}"
    return f"{check.value:.1f} {check.unit}{mark}"


def mean_shift(a: Pose, b: Pose, points: FloatArray) -> float:
    """Mean distance (mm) between where two poses send ``points``."""
    diff = points @ (a[0] - b[0]).T + (a[1] - b[1])
    return float(np.linalg.norm(diff, axis=1).mean())


def check_optimum(pair: Pair, pose: Pose, pts: FloatArray) -> Check:
    """A fresh local search from ``pose`` must not move it: on the 2 mm level, then on the
    finest level with sample points drawn independently of the refinement's."""
    c = pair.mr_center
    near = local_search(pair.similarity(1, CHECK_POINTS), [pose], c, 2.0, 0.5)[0]
    sim = pair.level_similarity(FINAL_LEVEL, seed=SEED + 1)
    fine = newton_search(sim, [(near.matrix, near.offset)], c, *FINAL_STEPS)[0]
    moved = mean_shift(pose, (fine.matrix, fine.offset), pts)
    return Check(
        "optimum",
        moved <= OPTIMUM_TOL_MM,
        moved,
        OPTIMUM_TOL_MM,
        "mm",
        f"the metric's optimum lies {moved:.1f} mm from the result "
        f"(limit {OPTIMUM_TOL_MM:.1f} mm): the result is not where the images fit best",
    )


def _start_params() -> list[FloatArray]:
    out = []
    for k in range(6):
        for sign in (1.0, -1.0):
            p = np.zeros(6)
            p[k] = sign * START_MM
            out.append(p)
    return out


def check_starts(pair: Pair, pose: Pose, pts: FloatArray) -> Check:
    """Starts around the result (on the 4 mm level) must come back to it or end at a pose that
    fits worse; one that ends elsewhere and fits better is refined and compared on the finest
    level's metric."""
    c = pair.mr_center
    sim = pair.similarity(0, START_POINTS)
    starts = [pose] + [step_pose(pose[0], pose[1], c, p) for p in _start_params()]
    ends = local_search(sim, starts, c, 4.0, 1.0)
    home = ends[0]
    agree, rivals = 0, []
    for end in ends[1:]:
        dist = mean_shift((home.matrix, home.offset), (end.matrix, end.offset), pts)
        if dist <= AGREE_MM:
            agree += 1
        elif end.value > home.value * (1.0 + BETTER_MARGIN):
            rivals.append((end.matrix, end.offset))
    confirmed = _confirmed_better(pair, pose, rivals)
    total = len(ends) - 1
    return Check(
        "starts",
        confirmed == 0,
        float(agree),
        float(total),
        f"/{total} agree",
        f"{confirmed} of {total} independent starts found a pose that fits better than the "
        f"result and lies more than {AGREE_MM:.0f} mm from it ({agree} came back)",
    )


def _confirmed_better(pair: Pair, pose: Pose, rivals: list[Pose]) -> int:
    """How many ``rivals``, refined, beat ``pose`` on the finest level's metric."""
    if not rivals:
        return 0
    c = pair.mr_center
    near = local_search(pair.similarity(1, CHECK_POINTS), [pose, *rivals], c, 1.0, 0.25)
    sim = pair.level_similarity(FINAL_LEVEL)
    values = sim.evaluate(Poses.of([(p.matrix, p.offset) for p in near]))[0]
    return int(np.sum(values[1:] > values[0] * (1.0 + BETTER_MARGIN)))


def check_mirror(pair: Pair, pose: Pose) -> Check:
    """The best mirror-image pose must fit worse than the result (both refined on the 2 mm
    level with the same samples)."""
    c = pair.mr_center
    cands = global_search.search(pair, improper=True, polish=MIRROR_CANDIDATES)
    sim = pair.level_similarity(1)
    near = local_search(sim, [pose] + [(x.matrix, x.offset) for x in cands], c, 2.0, 0.25)
    best = max(near[1:], key=lambda r: r.value)
    ratio = best.value / near[0].value if near[0].value > 0 else math.inf
    return Check(
        "mirror",
        ratio < 1.0,
        ratio,
        1.0,
        "x",
        f"a mirror image of the MR fits the CT {ratio:.2f} times as well as the result: the MR "
        "may be flipped left-right (no rigid registration can be right)",
    )


def _halves(sim_points: FloatArray, pair: Pair) -> list[np.ndarray]:
    """Boolean selections of the MR samples on either side of the head centre, per MR axis."""
    axes = geo.direction(pair.mr_image)
    out = []
    for k in range(3):
        side = (sim_points - pair.mr_center) @ axes[:, k]
        out += [side >= 0, side < 0]
    return out


def check_halves(pair: Pair, pose: Pose) -> Check:
    """Each half of the MR registered on its own must agree with the result."""
    whole = pair.similarity(1, CHECK_POINTS)
    worst, worst_name = 0.0, ""
    names = ("row+", "row-", "column+", "column-", "slice+", "slice-")
    for name, sel in zip(names, _halves(whole.points, pair), strict=True):
        if int(sel.sum()) < CHECK_POINTS // 10:
            continue
        sub = whole.subset(sel)
        center = sub.points.mean(axis=0)
        end = local_search(sub, [pose], center, 2.0, 0.25)[0]
        shift = mean_shift(pose, (end.matrix, end.offset), sub.points)
        if shift > worst:
            worst, worst_name = shift, name
    where = (
        f"the {worst_name} half of the MR, registered alone, lies {worst:.1f} mm from the result"
    )
    warning = ""
    if HALVES_WARN_MM < worst <= HALVES_FAIL_MM:
        warning = (
            f"{where}: the images differ non-rigidly (distortion, deformation, positioning), "
            f"so the fusion may be off by about that much in places: check it where it matters"
        )
    return Check(
        "halves",
        worst <= HALVES_FAIL_MM,
        worst,
        HALVES_FAIL_MM,
        "mm",
        f"{where} (limit {HALVES_FAIL_MM:.0f} mm): the two images do not match as one rigid "
        "body (wrong patient or series, or a large deformation)",
        warning,
    )


def evaluate(pair: Pair, pose: Pose) -> list[Check]:
    """All checks of ``pose`` (MR point -> CT point)."""
    pts = pair.mr_points(3000)
    return [
        check_optimum(pair, pose, pts),
        check_starts(pair, pose, pts),
        check_mirror(pair, pose),
        check_halves(pair, pose),
    ]


__all__ = ["Check", "RegistrationQuality", "evaluate"]
