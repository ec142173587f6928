"""Mutual information of MR sample points against the CT, for many poses at once (numpy).

The MR is the *domain*: its head voxels are the sample points, and a pose maps them into the CT.
Sampling the MR, not the CT, keeps the metric well defined when the MR covers only part of the
head (a slab, a small field of view): every sample has MR data, and the CT, which covers the
head, holds a value for it.

Bins sit at equal quantiles of each image (:func:`quantile_edges`). Histograms use linear
Parzen windows (each value spreads over its two nearest bins), so the
mutual information changes smoothly with the pose and small steps of a pattern search see real
differences rather than steps of a hard binning. One batched ``map_coordinates`` call serves a
whole set of poses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from fusion_engine.registration.geometry import FloatArray, index_to_physical

HISTOGRAM_BINS = 32
"""Bins of the joint histogram (both axes)."""

MIN_INSIDE = 0.5
"""A pose that maps fewer than this fraction of the samples into the CT scores zero."""


@dataclass(frozen=True)
class Poses:
    """A stack of affine poses y = matrices[k] @ x + offsets[k] (MR point -> CT point)."""

    matrices: FloatArray  # (P, 3, 3)
    offsets: FloatArray  # (P, 3)

    @staticmethod
    def of(items: list[tuple[FloatArray, FloatArray]]) -> Poses:
        """Stack (matrix, offset) pairs."""
        return Poses(
            np.stack([np.asarray(m, dtype=np.float64) for m, _ in items]),
            np.stack([np.asarray(o, dtype=np.float64) for _, o in items]),
        )

    def __len__(self) -> int:
        return int(self.matrices.shape[0])


def bin_positions(values: npt.NDArray[np.floating], edges: FloatArray) -> FloatArray:
    """Continuous bin positions (0 .. bins - 1) of ``values`` for bin centres ``edges``."""
    out: FloatArray = np.interp(values, edges, np.arange(len(edges), dtype=np.float64))
    return out


def bin_image(array: npt.NDArray[np.float32], edges: FloatArray) -> npt.NDArray[np.float32]:
    """An image's values as bin positions (float32), computed once per pyramid level."""
    return bin_positions(array, edges).astype(np.float32)


def _split(pos: FloatArray, bins: int) -> tuple[FloatArray, FloatArray]:
    """Lower bin index (as float) and weight of the upper bin for linear Parzen windows."""
    low = np.minimum(np.floor(pos), bins - 2)
    return low, pos - low


def quantile_edges(values: npt.NDArray[np.floating]) -> FloatArray:
    """Bin centres at equal quantiles of ``values`` (strictly increasing).

    Equal-frequency bins give soft tissue, which fills most of a head, most of the bins: on a
    linear scale from air to bone, CT soft tissues would share two or three bins.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        finite = np.zeros(1)
    edges = np.percentile(finite, np.linspace(0.5, 99.5, HISTOGRAM_BINS))
    step = max(float(edges[-1] - edges[0]), 1e-3) * 1e-6
    out: FloatArray = np.maximum.accumulate(edges) + step * np.arange(HISTOGRAM_BINS)
    return out


class Similarity:
    """Parzen-window mutual information (nats) of fixed MR samples against a moving CT."""

    def __init__(
        self,
        points: FloatArray,
        values: FloatArray,
        moving: sitk.Image,
        moving_bins: npt.NDArray[np.float32],
        fixed_edges: FloatArray,
        bins: int = HISTOGRAM_BINS,
    ) -> None:
        """``moving_bins`` holds the moving image's values as positions on
        :data:`HISTOGRAM_BINS` bins (see :func:`bin_image`), so an evaluation interpolates bin
        positions directly; ``bins`` (a divisor of that) merges neighbouring bins, for
        estimates from few samples."""
        if points.shape[0] == 0:
            raise ValueError("no sample points")
        if HISTOGRAM_BINS % bins:
            raise ValueError(f"bins must divide {HISTOGRAM_BINS}, got {bins}")
        self.bins = bins
        self.factor = (bins - 1) / (HISTOGRAM_BINS - 1)
        self.points = np.asarray(points, dtype=np.float64)
        fixed = bin_positions(np.asarray(values), fixed_edges) * self.factor
        low, weight = _split(fixed, bins)
        self.fixed_row = low.astype(np.int64) * bins
        self.fixed_lower, self.fixed_upper = 1.0 - weight, weight
        a, o = index_to_physical(moving)
        self.to_index = np.linalg.inv(a)
        self.origin = o
        self.moving = moving_bins
        self.upper = np.array(moving_bins.shape, dtype=np.float64) - 0.5  # z, y, x

    def subset(self, selection: npt.NDArray[np.bool_]) -> Similarity:
        """The same metric on a subset of the sample points."""
        out = object.__new__(Similarity)
        out.__dict__.update(self.__dict__)
        out.points = self.points[selection]
        out.fixed_row = self.fixed_row[selection]
        out.fixed_lower = self.fixed_lower[selection]
        out.fixed_upper = self.fixed_upper[selection]
        return out

    @property
    def count(self) -> int:
        """Number of sample points."""
        return int(self.points.shape[0])

    def moving_indices(self, poses: Poses) -> FloatArray:
        """Continuous (z, y, x) indices into the moving image, shape (3, P, N).

        The index map is folded into each pose, and all poses go through one matrix product
        (shape (N, 3) x (3, 3P)), much faster than a batched product over tiny matrices.
        """
        mats = np.einsum("ij,pjk->pik", self.to_index, poses.matrices)[:, ::-1, :]  # rows z,y,x
        offs = ((poses.offsets - self.origin) @ self.to_index.T)[:, ::-1]
        count = len(poses)
        stacked = mats.transpose(2, 0, 1).reshape(3, count * 3)
        out = (self.points @ stacked).reshape(-1, count, 3) + offs[None, :, :]
        result: FloatArray = np.ascontiguousarray(out.transpose(2, 1, 0))
        return result

    def evaluate(self, poses: Poses) -> tuple[FloatArray, FloatArray]:
        """Mutual information and inside fraction of each pose (both shape (P,))."""
        idx = self.moving_indices(poses)
        inside = np.all((idx >= -0.5) & (idx <= self.upper[:, None, None]), axis=0)
        pos = ndimage.map_coordinates(self.moving, idx.reshape(3, -1), order=1, mode="nearest")
        pos = pos.reshape(inside.shape) * self.factor
        low = np.minimum(pos.astype(np.int64), self.bins - 2)  # pos >= 0: truncation = floor
        upper = (pos - low) * inside
        lower = inside - upper
        return self._mutual_information(low, lower, upper, inside)

    def _mutual_information(
        self,
        low: npt.NDArray[np.int64],
        lower: FloatArray,
        upper: FloatArray,
        inside: npt.NDArray[np.bool_],
    ) -> tuple[FloatArray, FloatArray]:
        """MI per pose from the moving bins (``low`` and the weights of ``low`` and
        ``low + 1``, zero outside the image). The four Parzen corners share one index array:
        each is histogrammed at the lower-left corner and shifted on the small histogram."""
        count, bins = low.shape[0], self.bins
        cells = count * bins * bins
        index = (low + self.fixed_row + (np.arange(count) * bins * bins)[:, None]).ravel()
        joint = np.zeros((count, bins + 1, bins + 1))
        for fw, di in ((self.fixed_lower, 0), (self.fixed_upper, 1)):
            for mw, dj in ((lower, 0), (upper, 1)):
                part = np.bincount(index, weights=(fw * mw).ravel(), minlength=cells)
                joint[:, di : di + bins, dj : dj + bins] += part.reshape(count, bins, bins)
        joint = joint[:, :bins, :bins]
        total = np.maximum(joint.sum(axis=(1, 2)), 1e-12)
        p = joint / total[:, None, None]
        px, py = p.sum(axis=2), p.sum(axis=1)
        mi = _entropy(px) + _entropy(py) - _entropy(p.reshape(count, -1))
        frac = inside.mean(axis=1)
        mi = np.where(frac >= MIN_INSIDE, mi, 0.0)
        return mi, frac


def _entropy(p: FloatArray) -> FloatArray:
    """Shannon entropy (nats) of each row of ``p``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    out: FloatArray = terms.sum(axis=1)
    return out
