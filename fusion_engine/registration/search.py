"""Global search for the MR's pose in the CT, on the coarsest pyramid level (about 4 mm).

Candidate orientations: the 24 axis-aligned rotations (feet-first vs head-first, prone vs
supine and any other whole-body reorientation that the headers may not describe), each also
tilted by each of :data:`TILTS_DEG` about the three axes and the four diagonals, the four
principal-axes (moments) alignments of the two head masks, and the header geometry (identity).
For each orientation the MR head centre is put on the CT head centre and, where one image
covers only part of the head (its mask touches an end of its image, e.g. an MR slab or a small
field of view), also slid along that direction over the whole room the other image leaves: a
slab may lie anywhere in the head. All poses are scored by mutual information on a few hundred
MR points; the best few hundred again on a few thousand; the best distinct ones are polished by
a local search before they are ranked.

``improper=True`` searches mirror-image poses instead (every orientation composed with a
reflection of the MR): the reliability check compares the best of them with the result to
tell whether the MR is a left-right mirror image of the patient.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from fusion_engine.registration import geometry as geo
from fusion_engine.registration.geometry import FloatArray
from fusion_engine.registration.pair import Pair
from fusion_engine.registration.refine import local_search
from fusion_engine.registration.similarity import HISTOGRAM_BINS, Poses

TILTS_DEG = (11.0, 22.0, 33.0)
"""Tilts added to each axis-aligned orientation: steps of 11 degrees up to 33 cover heads
turned by up to 30 degrees to within about 8 degrees of a candidate. One 22-degree tilt left a
60 mm slab turned by 30 degrees 25 mm off (no candidate near enough for the slab's few
structures to pull the polish into the right basin); the finer set costs about 3 s more."""

SCREEN_POINTS = 1000
SCREEN_BINS = 16
"""MR points and histogram bins used to screen every candidate pose (with 43 tilts per
orientation, 500 points let noise lift wrong poses above the right one in the screen)."""

RESCORE_POINTS = 2500
"""MR points used to rescore the best screened poses and to polish."""

RESCORE_COUNT = 600
"""How many screened poses are rescored."""

POLISH_COUNT = 12
"""How many distinct rescored poses are polished (the finer tilts give more distinct wrong
poses that rescore well; with 6 the right one was crowded out for a small field of view)."""

POLISH_STEPS = (6.0, 3.0)
POLISH_ITERATIONS = 12
"""First and last step (degrees / mm) and most iterations of the polish (it only ranks)."""

SLIDE_STEP_MM = 10.0
"""Spacing of the slide positions along a direction where one image cuts the head."""

SLIDE_MIN_MM = 12.0
"""Room below which no slide is tried along a direction."""

MAX_POSITIONS = 36
"""At most this many positions per orientation (slide steps grow to fit)."""

DISTINCT_DEG = 15.0
DISTINCT_MM = 12.0
"""Poses closer than this (rotation and shift of the MR centre) count as one."""

BATCH = 256
"""Poses per batched metric evaluation."""


@dataclass
class Candidate:
    """A pose (MR -> CT) from the search, its metric value and where it came from."""

    value: float
    label: str
    matrix: FloatArray
    offset: FloatArray


def reflection(pair: Pair) -> FloatArray:
    """Mirror across the MR's sagittal plane (normal: the MR's first index axis)."""
    axis = geo.direction(pair.mr_image)[:, 0]
    out: FloatArray = np.eye(3) - 2.0 * np.outer(axis, axis)
    return out


def orientations(pair: Pair) -> list[tuple[str, FloatArray]]:
    """(label, R) of every candidate orientation (proper rotations)."""
    out: list[tuple[str, FloatArray]] = [("header", np.eye(3))]
    tilts = [np.eye(3)]
    for axis in [*np.eye(3), *(np.array(s) for s in itertools.product((1.0, -1.0), repeat=3))]:
        if axis[0] < 0:  # a diagonal and its opposite give the same two tilts
            continue
        for degrees in TILTS_DEG:
            for sign in (1.0, -1.0):
                tilts.append(geo.rotation_about(axis, sign * degrees))
    for ci, cube in enumerate(geo.cube_rotations()):
        for ti, tilt in enumerate(tilts):
            out.append((f"axes{ci}.{ti}", tilt @ cube))
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
        r = pair.ct_axes @ np.diag(np.array(signs, dtype=np.float64)) @ pair.mr_axes.T
        if np.linalg.det(r) < 0:
            r = -r
        out.append((f"moments{signs}", r))
    return out


def _directions(pair: Pair, matrix: FloatArray) -> list[FloatArray]:
    """Unit vectors (CT space) along which one image cuts the head; near-parallel ones merged."""
    dirs = [matrix @ geo.direction(pair.mr_image)[:, i] for i in pair.mr_cut]
    dirs += [geo.direction(pair.ct_image)[:, i] for i in pair.ct_cut]
    out: list[FloatArray] = []
    for d in dirs:
        if all(abs(float(d @ o)) < 0.9 for o in out):
            out.append(d / np.linalg.norm(d))
    return out


def slides(
    matrix: FloatArray, offset: FloatArray, pair: Pair, ct_pts: FloatArray, mr_pts: FloatArray
) -> list[FloatArray]:
    """Extra shifts (CT mm) for a pose: where one image cuts the head, the MR head may lie
    anywhere along that direction within the other: positions over the whole room."""
    mapped = mr_pts @ matrix.T + offset
    axes: list[FloatArray] = []
    for u in _directions(pair, matrix):
        pc, pm = ct_pts @ u, mapped @ u
        ends = (float(pc.min() - pm.min()), float(pc.max() - pm.max()))
        lo, hi = min(ends), max(ends)
        if hi - lo >= SLIDE_MIN_MM:
            axes.append(np.stack([lo, hi, *u]))
    if not axes:
        return [np.zeros(3)]
    step = SLIDE_STEP_MM
    while True:
        counts = [int((a[1] - a[0]) // step) + 1 for a in axes]
        if int(np.prod(counts)) <= MAX_POSITIONS:
            break
        step *= 1.25
    grids = [
        [a[2:] * v for v in np.linspace(a[0], a[1], n)] for a, n in zip(axes, counts, strict=True)
    ]
    return [np.sum(combo, axis=0) for combo in itertools.product(*grids)]


def _score(
    pair: Pair, count: int, bins: int, poses: list[tuple[FloatArray, FloatArray]]
) -> FloatArray:
    sim = pair.similarity(0, count, bins=bins)
    values = [sim.evaluate(Poses.of(poses[i : i + BATCH]))[0] for i in range(0, len(poses), BATCH)]
    out: FloatArray = np.concatenate(values) if values else np.zeros(0)
    return out


def distinct(candidates: list[Candidate], count: int, center: FloatArray) -> list[Candidate]:
    """The best ``count`` candidates (sorted best first), skipping those close to a better
    one already taken (``center``: the MR head centre, where shifts are compared)."""
    taken: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: -c.value):
        here = cand.matrix @ center + cand.offset
        close = any(
            geo.rotation_angle_deg(cand.matrix @ t.matrix.T) < DISTINCT_DEG
            and float(np.linalg.norm(here - (t.matrix @ center + t.offset))) < DISTINCT_MM
            for t in taken
        )
        if not close:
            taken.append(cand)
        if len(taken) == count:
            break
    return taken


def search(pair: Pair, *, improper: bool = False, polish: int = POLISH_COUNT) -> list[Candidate]:
    """Distinct polished candidates (at most ``polish``), best first (see the module
    docstring)."""
    mirror = reflection(pair) if improper else np.eye(3)
    ct_pts, mr_pts = pair.ct_points(3000), pair.mr_points(3000)
    poses: list[tuple[FloatArray, FloatArray]] = []
    labels: list[str] = []
    for label, rot in orientations(pair):
        r = rot @ mirror
        base = pair.ct_center - r @ pair.mr_center
        for k, shift in enumerate(slides(r, base, pair, ct_pts, mr_pts)):
            poses.append((r, base + shift))
            labels.append(f"{label}/{k}")
    screened = _score(pair, SCREEN_POINTS, SCREEN_BINS, poses)
    best = np.argsort(-screened)[:RESCORE_COUNT]
    rescored = _score(pair, RESCORE_POINTS, HISTOGRAM_BINS, [poses[i] for i in best])
    cands = [
        Candidate(float(v), labels[i], poses[i][0], poses[i][1])
        for v, i in zip(rescored, best, strict=True)
    ]
    chosen = distinct(cands, polish, pair.mr_center)
    polished = local_search(
        pair.similarity(0, RESCORE_POINTS),
        [(c.matrix, c.offset) for c in chosen],
        pair.mr_center,
        *POLISH_STEPS,
        max_iterations=POLISH_ITERATIONS,
    )
    out = [
        Candidate(p.value, c.label, p.matrix, p.offset)
        for c, p in zip(chosen, polished, strict=True)
    ]
    return distinct(out, len(out), pair.mr_center)
