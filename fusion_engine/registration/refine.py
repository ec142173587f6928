"""Local refinement of poses on one metric: a batched coordinate-Newton pattern search.

A pose is moved by small rigid steps applied in MR space about the MR head centre (rotations
about the centre of the sample domain barely shift it, so rotation and translation stay nearly
independent). Each iteration evaluates the 12 neighbours at +-h along the six parameters of
every active pose in one batch, plus one combined step from a parabola through each
parameter's three values; the best of them is taken if it improves the metric, else the step
halves. A pose is final when no neighbour at the smallest step is better: it is a local
optimum of that metric *by construction*, which is what "refinement reaches the optimum" means
here, and what the reliability check tests again from outside.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from fusion_engine.errors import RegistrationError
from fusion_engine.registration.geometry import FloatArray, rotation_about
from fusion_engine.registration.pair import FINAL_LEVEL, Pair
from fusion_engine.registration.similarity import Poses, Similarity

log = logging.getLogger(__name__)

MAX_ITERATIONS = 60
"""Iterations per call at most (each is two batched metric evaluations)."""

IMPROVEMENT = 1e-6
"""A move must improve the metric by this (relative) to be taken; smaller gains halve the
step instead, so a converged search stops rather than creeping."""


@dataclass
class Local:
    """A refined pose (MR point -> CT point), its metric value and the iterations it took."""

    matrix: FloatArray
    offset: FloatArray
    value: float
    iterations: int


def step_pose(
    matrix: FloatArray, offset: FloatArray, center: FloatArray, params: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """The pose after a rigid step ``params`` = (rx, ry, rz in degrees, sx, sy, sz in mm),
    applied in MR space first: x -> Q (x - c) + c + s, Q the rotation by the rotation vector."""
    rot = params[:3]
    angle = float(np.linalg.norm(rot))
    q = rotation_about(rot / angle, angle) if angle > 1e-9 else np.eye(3)
    new_matrix = matrix @ q
    new_offset = matrix @ (center - q @ center + params[3:]) + offset
    return new_matrix, new_offset


def _neighbour_params(h: FloatArray) -> FloatArray:
    """(12, 6) parameter steps: +-h[k] along each of the six parameters."""
    out = np.zeros((12, 6))
    for k in range(6):
        out[2 * k, k] = h[k]
        out[2 * k + 1, k] = -h[k]
    return out


def _parabola_step(f0: FloatArray, fn: FloatArray, h: FloatArray) -> FloatArray:
    """Per parameter, the offset to the vertex of the parabola through -h, 0, +h (clipped to
    +-h; toward the better neighbour where the parabola opens upward)."""
    plus, minus = fn[..., 0::2], fn[..., 1::2]
    curvature = plus + minus - 2.0 * f0[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(curvature < 0, -h * (plus - minus) / (2.0 * curvature), 0.0)
    uphill = np.where(plus > minus, h, -h)
    step = np.where(curvature < 0, vertex, uphill)
    out: FloatArray = np.clip(step, -h, h)
    return out


def local_search(
    sim: Similarity,
    starts: list[tuple[FloatArray, FloatArray]],
    center: FloatArray,
    first_step: float,
    last_step: float,
    *,
    rotations: bool = True,
    max_iterations: int = MAX_ITERATIONS,
) -> list[Local]:
    """Refine every start on ``sim`` (batched); steps from ``first_step`` down to ``last_step``
    (degrees for rotations, mm for shifts). ``rotations=False`` refines shifts only."""
    count = len(starts)
    mats = np.stack([np.asarray(m, dtype=np.float64) for m, _ in starts])
    offs = np.stack([np.asarray(o, dtype=np.float64) for _, o in starts])
    values = sim.evaluate(Poses(mats, offs))[0]
    first = float(first_step)
    h = np.full(count, first)
    iterations = np.zeros(count, dtype=np.int64)
    scale = (
        np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
        if rotations
        else np.array([0, 0, 0, 1.0, 1.0, 1.0])
    )
    for _ in range(max_iterations):
        active = np.flatnonzero(h >= last_step * (1.0 - 1e-9))
        if active.size == 0:
            break
        steps = [h[i] * scale for i in active]
        neigh = [_neighbour_params(s) for s in steps]
        cand = [
            step_pose(mats[i], offs[i], center, p)
            for i, ps in zip(active, neigh, strict=True)
            for p in ps
        ]
        fn = sim.evaluate(Poses.of(cand))[0].reshape(active.size, 12)
        jumps = _parabola_step(values[active], fn, np.stack(steps))
        jump_poses = [
            step_pose(mats[i], offs[i], center, j) for i, j in zip(active, jumps, strict=True)
        ]
        fj = sim.evaluate(Poses.of(jump_poses))[0]
        for n, i in enumerate(active):
            iterations[i] += 1
            best_n = int(np.argmax(fn[n]))
            gain = IMPROVEMENT * max(1.0, abs(float(values[i])))
            if fj[n] >= fn[n, best_n] and fj[n] > values[i] + gain:
                mats[i], offs[i] = jump_poses[n]
                values[i] = fj[n]
                # A jump that hit the bound says the optimum is further away: grow the step.
                reach = float(np.max(np.abs(jumps[n]) / np.maximum(steps[n], 1e-12)))
                if reach >= 1.0 - 1e-9:
                    h[i] = min(2.0 * h[i], first)
            elif fn[n, best_n] > values[i] + gain:
                mats[i], offs[i] = cand[n * 12 + best_n]
                values[i] = fn[n, best_n]
            else:
                h[i] /= 2.0
    return [
        Local(mats[i].copy(), offs[i].copy(), float(values[i]), int(iterations[i]))
        for i in range(count)
    ]


COARSE_PLAN: tuple[tuple[int, int, float, float], ...] = ((0, 4, 3.0, 0.5), (1, 2, 1.0, 0.25))
"""Per coarse stage: pyramid level, how many poses it refines at most, first and last step
(degrees / mm) of the coordinate search."""

FINAL_STEPS = (0.5, 0.05)
"""First design radius and final tolerance (degrees / mm) of the quadratic-model search on the
finest level, which defines the result."""

KEEP_FRACTION = 0.8
"""Poses whose metric is below this fraction of the best are not refined further."""


def refine_candidates(pair: Pair, starts: list[tuple[float, FloatArray, FloatArray]]) -> Local:
    """Refine (value, matrix, offset) search candidates: coordinate search on the coarse
    levels, then the quadratic-model search on the finest level, whose optimum is the result
    (its value is that metric's); iterations of all stages are summed."""
    values = [v for v, _, _ in starts]
    current = [(m, o) for _, m, o in starts]
    total = 0
    for level, keep, first, last in COARSE_PLAN:
        top = max(values)
        current = [p for p, v in zip(current, values, strict=True) if v >= KEEP_FRACTION * top]
        res = local_search(
            pair.level_similarity(level), current[:keep], pair.mr_center, first, last
        )
        res.sort(key=lambda r: -r.value)
        total += sum(r.iterations for r in res)
        current = [(r.matrix, r.offset) for r in res]
        values = [r.value for r in res]
        log.debug("level %d: best metric %.4f of %d poses", level, res[0].value, len(res))
    if not current:
        raise RegistrationError("no registration candidate")
    best = newton_search(
        pair.level_similarity(FINAL_LEVEL), current[:1], pair.mr_center, *FINAL_STEPS
    )[0]
    best.iterations += total
    return best


def _design(h: float) -> FloatArray:
    """Parameter steps around a pose for a quadratic fit: the centre, +-h on each axis and
    +-(h, h) on each pair of axes (43 points for the 28 coefficients of a quadratic)."""
    rows = [np.zeros(6)]
    for k in range(6):
        for sign in (1.0, -1.0):
            p = np.zeros(6)
            p[k] = sign * h
            rows.append(p)
    for i, j in itertools.combinations(range(6), 2):
        for sign in (1.0, -1.0):
            p = np.zeros(6)
            p[i], p[j] = sign * h, sign * h
            rows.append(p)
    return np.stack(rows)


def _features(x: FloatArray) -> FloatArray:
    """Quadratic features [1, x_i, x_i x_j (i <= j)] of parameter rows ``x``."""
    pairs = [x[:, i] * x[:, j] for i in range(6) for j in range(i, 6)]
    return np.column_stack([np.ones(len(x)), x, *pairs])


def _quadratic(x: FloatArray, f: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Gradient and Hessian at 0 of the quadratic least-squares fit of ``f`` at ``x``."""
    coef = np.linalg.lstsq(_features(x), f, rcond=None)[0]
    hess = np.zeros((6, 6))
    k = 7
    for i in range(6):
        for j in range(i, 6):
            hess[i, j] = hess[j, i] = coef[k] * (2.0 if i == j else 1.0)
            k += 1
    grad: FloatArray = np.asarray(coef[1:7], dtype=np.float64)
    return grad, hess


def _ascent(g: FloatArray, hess: FloatArray, limit: float) -> FloatArray:
    """Newton step to the maximum of the quadratic model (a gradient step where the model is
    not concave), clipped to +-``limit`` per parameter."""
    if np.linalg.eigvalsh(hess).max() < 0:
        step = -np.linalg.solve(hess, g)
    else:
        step = g / max(float(np.abs(g).max()), 1e-12) * limit
    out: FloatArray = np.clip(step, -limit, limit)
    return out


@dataclass
class _Track:
    """State of one pose in :func:`newton_search`."""

    matrix: FloatArray
    offset: FloatArray
    radius: float
    hess: FloatArray | None = None
    value: float = -np.inf
    iterations: int = 0


GRADIENT_STEP = 0.25
"""Central-difference step (degrees / mm) of the gradient in :func:`newton_search`."""


def newton_search(
    sim: Similarity,
    starts: list[tuple[FloatArray, FloatArray]],
    center: FloatArray,
    first_step: float,
    tolerance: float,
    *,
    max_iterations: int = 20,
) -> list[Local]:
    """Refine every start on ``sim`` by Newton steps on a quadratic model (batched).

    The first iteration fits a full quadratic (the 21 couplings of the six parameters) on a
    design of radius ``first_step``: rotation and translation are coupled in a long valley
    where coordinate steps stall, and the fitted Hessian follows it. Later iterations reuse
    that Hessian with a central-difference gradient (13 poses instead of 43). A step that
    fails halves the trust radius; the search ends when the radius or the step falls below
    ``tolerance``.
    """
    design = _design(1.0)
    tracks = [_Track(np.asarray(m, float), np.asarray(o, float), first_step) for m, o in starts]
    for _ in range(max_iterations):
        active = [t for t in tracks if t.radius >= tolerance]
        if not active:
            break
        probes = [
            design * t.radius if t.hess is None else design[:13] * GRADIENT_STEP for t in active
        ]
        poses = [
            step_pose(t.matrix, t.offset, center, p)
            for t, ps in zip(active, probes, strict=True)
            for p in ps
        ]
        f = sim.evaluate(Poses.of(poses))[0]
        jumps, start = [], 0
        for t, ps in zip(active, probes, strict=True):
            fv = f[start : start + len(ps)]
            start += len(ps)
            t.value = float(fv[0])
            if t.hess is None:
                g, t.hess = _quadratic(ps, fv)
            else:
                g = (fv[1:13:2] - fv[2:13:2]) / (2.0 * GRADIENT_STEP)
            jumps.append(_ascent(g, t.hess, t.radius))
        moved = [
            step_pose(t.matrix, t.offset, center, j) for t, j in zip(active, jumps, strict=True)
        ]
        fj = sim.evaluate(Poses.of(moved))[0]
        for t, j, m, v in zip(active, jumps, moved, fj, strict=True):
            t.iterations += 1
            if v > t.value + IMPROVEMENT * max(1.0, abs(t.value)):
                t.matrix, t.offset, t.value = m[0], m[1], float(v)
                if float(np.abs(j).max()) < tolerance:
                    t.radius = 0.0
            else:
                t.radius /= 2.0
    return [Local(t.matrix, t.offset, t.value, t.iterations) for t in tracks]
