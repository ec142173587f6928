"""Dataset loading for training and evaluation (PNG pairs and DICOM volumes via SimpleITK).

* AANLIB pairs: ``<root>/aanlib-ct-mri/CT/NNNNN.png`` and ``.../MRI/NNNNN.png``; a name is the
  case followed by a three-digit slice number (``16003`` is case 16, ``2004`` is case 2).
  Train/validation are split by case, never by slice.
* MRI-DIR phantom: ``<root>/mridir-phantom/{ct,mr}`` DICOM series read with SimpleITK's
  ImageSeriesReader (no pydicom here); axial slices, CT through :func:`ct_to_unit`, MR through
  :func:`mr_to_unit` over the whole volume. The phantom is a single case, so it is used for
  training only.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from fusion_engine.defaults import DEFAULT_CT_WINDOW
from fusion_engine.errors import InputError
from fusion_engine.intensity import ct_to_unit, mr_to_unit, png_to_unit

DEFAULT_VAL_CASES: tuple[str, ...] = ("21", "34")
"""AANLIB cases held out for validation and evaluation (17 + 21 = 38 pairs)."""

FloatArray = npt.NDArray[np.float32]


def default_data_root() -> Path:
    """``$FUSION_DATA`` if set, else ``../shared/data`` relative to the working directory."""
    env = os.environ.get("FUSION_DATA")
    if env:
        return Path(env)
    return Path("../shared/data")


@dataclass(frozen=True)
class PairFiles:
    """A CT/MR file pair with the same name in ``CT/`` and ``MRI/``."""

    name: str
    ct: Path
    mr: Path

    @property
    def case(self) -> str:
        """The case (patient): the name without its last three digits (the slice number)."""
        return case_of(self.name)


SLICE_DIGITS = 3
"""Digits of the slice number at the end of an AANLIB pair name."""


def case_of(name: str) -> str:
    """The case of a pair name: ``16003`` -> ``16``, ``2004`` -> ``2``.

    Raises :class:`InputError` for a name that is not a case followed by a slice number.
    """
    if len(name) <= SLICE_DIGITS or not name.isdigit():
        raise InputError(f"pair name {name!r} is not CASE followed by a 3-digit slice number")
    return name[:-SLICE_DIGITS]


def read_grey_png(path: Path) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """Read an 8- or 16-bit grey PNG (RGB is converted to luminance) as uint8/uint16."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.int64)
            if arr.min() < 0 or arr.max() > 65535:
                raise InputError(f"{path}: pixel values outside 16-bit range")
            return arr.astype(np.uint16)
        grey = im if im.mode == "L" else im.convert("L")
        return np.asarray(grey, dtype=np.uint8).copy()


def read_unit_png(path: Path) -> FloatArray:
    """Read a grey PNG to float32 in [0, 1]."""
    return png_to_unit(read_grey_png(path))


def list_pairs(pairs_dir: Path, cases: set[str] | None = None) -> list[PairFiles]:
    """Matching ``CT/*.png`` and ``MRI/*.png`` of a pairs directory, sorted by name.

    ``cases`` restricts to pairs of those cases (see :func:`case_of`).
    """
    ct_dir, mr_dir = pairs_dir / "CT", pairs_dir / "MRI"
    if not ct_dir.is_dir() or not mr_dir.is_dir():
        raise InputError(f"{pairs_dir} must contain CT/ and MRI/ directories")
    mr_names = {p.name for p in mr_dir.glob("*.png")}
    out = [
        PairFiles(p.stem, p, mr_dir / p.name)
        for p in sorted(ct_dir.glob("*.png"))
        if p.name in mr_names
    ]
    if cases is not None:
        out = [p for p in out if p.case in cases]
    return out


@dataclass(frozen=True)
class PairSet:
    """Registered CT/MR pairs as two (N, H, W) float32 stacks in [0, 1], with their names."""

    ct: FloatArray
    mr: FloatArray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def load_pair_set(pairs_dir: Path, cases: set[str]) -> PairSet:
    """The pairs of ``cases`` (all images must have one size), or InputError when none."""
    pairs = list_pairs(pairs_dir, cases)
    if not pairs:
        raise InputError(f"no CT/MRI pairs of cases {sorted(cases)} in {pairs_dir}")
    ct = [read_unit_png(p.ct) for p in pairs]
    mr = [read_unit_png(p.mr) for p in pairs]
    if len({x.shape for x in ct + mr}) != 1:
        raise InputError(f"the pairs of {pairs_dir} differ in size")
    return PairSet(np.stack(ct), np.stack(mr), tuple(p.name for p in pairs))


def random_pair_crops(
    pairs: PairSet, batch: int, crop: int, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray]:
    """(batch, 1, crop, crop) CT and MR crops, the same window and flips for both sources.

    ``crop`` at most the image size; random horizontal and vertical flips.
    """
    h, w = pairs.ct.shape[1:]
    if crop > min(h, w):
        raise InputError(f"crop {crop} exceeds the pair size {h}x{w}")
    ct = np.empty((batch, 1, crop, crop), dtype=np.float32)
    mr = np.empty_like(ct)
    for k in range(batch):
        i = int(rng.integers(len(pairs)))
        y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
        a = pairs.ct[i, y : y + crop, x : x + crop]
        b = pairs.mr[i, y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        if rng.random() < 0.5:
            a, b = a[::-1, :], b[::-1, :]
        ct[k, 0], mr[k, 0] = a, b
    return ct, mr


def read_dicom_series(directory: Path) -> npt.NDArray[np.float32]:
    """Read a DICOM series directory with SimpleITK to a (Z, Y, X) float32 array."""
    sitk: Any = importlib.import_module("SimpleITK")
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(directory))
    if not files:
        raise InputError(f"no DICOM series in {directory}")
    reader.SetFileNames(files)
    image = reader.Execute()
    return np.asarray(sitk.GetArrayFromImage(image), dtype=np.float32)


@dataclass
class TrainingSet:
    """Single-channel training images (each float32 [0, 1] or CT HU) plus validation images.

    ``images`` hold unit-range images; ``ct_hu`` hold CT slices in HU (int16), windowed on the
    fly with a randomly chosen window from ``ct_windows`` (augmentation) when sampled.
    """

    images: list[FloatArray] = field(default_factory=list)
    ct_hu: list[npt.NDArray[np.int16]] = field(default_factory=list)
    ct_windows: tuple[tuple[float, float], ...] = (DEFAULT_CT_WINDOW,)
    val_images: list[FloatArray] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    description: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images) + len(self.ct_hu)

    def get(self, index: int, rng: np.random.Generator) -> FloatArray:
        """Image ``index`` as float32 [0, 1] (CT HU windowed with a random window)."""
        if index < len(self.images):
            return self.images[index]
        hu = self.ct_hu[index - len(self.images)]
        window = self.ct_windows[int(rng.integers(len(self.ct_windows)))]
        return ct_to_unit(hu, window)


def _useful_slices(vol: FloatArray, min_fraction: float = 0.05) -> list[int]:
    """Indices of slices with at least ``min_fraction`` of pixels above 0.05."""
    frac = (vol > 0.05).mean(axis=(1, 2))
    return [int(i) for i in np.nonzero(frac >= min_fraction)[0]]


def load_training_set(
    root: Path,
    *,
    val_cases: tuple[str, ...] = DEFAULT_VAL_CASES,
    use_phantom: bool = True,
    ct_windows: tuple[tuple[float, float], ...] = (DEFAULT_CT_WINDOW,),
    max_phantom_slices: int | None = None,
) -> TrainingSet:
    """Load AANLIB (split by case) and, when present and wanted, the MRI-DIR phantom slices."""
    pairs = list_pairs(root / "aanlib-ct-mri")
    if not pairs:
        raise InputError(f"no AANLIB pairs under {root / 'aanlib-ct-mri'}")
    ts = TrainingSet(ct_windows=ct_windows)
    train_cases = sorted({p.case for p in pairs} - set(val_cases))
    for p in pairs:
        ct, mr = read_unit_png(p.ct), read_unit_png(p.mr)
        if p.case in val_cases:
            ts.val_images += [ct, mr]
            ts.val_names += [f"{p.name}-CT", f"{p.name}-MR"]
        else:
            ts.images += [ct, mr]
    ts.description.append(
        f"AANLIB: {len(ts.images)} train images (cases {','.join(train_cases)}), "
        f"{len(ts.val_images)} validation images (cases {','.join(val_cases)})"
    )
    phantom = root / "mridir-phantom"
    if use_phantom and (phantom / "ct").is_dir() and (phantom / "mr").is_dir():
        ct_vol = read_dicom_series(phantom / "ct")
        mr_vol = mr_to_unit(read_dicom_series(phantom / "mr"))
        ct_keep = _useful_slices(ct_to_unit(ct_vol, DEFAULT_CT_WINDOW))
        mr_keep = _useful_slices(mr_vol)
        if max_phantom_slices is not None:
            ct_keep = ct_keep[:: max(1, len(ct_keep) // max_phantom_slices)][:max_phantom_slices]
            mr_keep = mr_keep[:: max(1, len(mr_keep) // max_phantom_slices)][:max_phantom_slices]
        hu = np.clip(ct_vol, -1024, 3071).astype(np.int16)
        ts.ct_hu += [np.ascontiguousarray(hu[i]) for i in ct_keep]
        ts.images += [np.ascontiguousarray(mr_vol[i]) for i in mr_keep]
        ts.description.append(
            f"MRI-DIR phantom: {len(ct_keep)} CT slices (windows {list(ct_windows)}), "
            f"{len(mr_keep)} MR slices (percentiles 1-99.5 over the volume)"
        )
    return ts


def random_crop_batch(
    ts: TrainingSet, batch: int, crop: int, rng: np.random.Generator
) -> FloatArray:
    """A (batch, 1, crop, crop) batch of random crops with random horizontal/vertical flips.

    Images smaller than ``crop`` are reflect-padded.
    """
    out = np.empty((batch, 1, crop, crop), dtype=np.float32)
    for k in range(batch):
        img = ts.get(int(rng.integers(len(ts))), rng)
        h, w = img.shape
        if h < crop or w < crop:
            ph, pw = max(0, crop - h), max(0, crop - w)
            img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect")
            h, w = img.shape
        y = int(rng.integers(h - crop + 1))
        x = int(rng.integers(w - crop + 1))
        patch = img[y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if rng.random() < 0.5:
            patch = patch[::-1, :]
        out[k, 0] = patch
    return out


def write_grey_png(path: Path, pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> None:
    """Write a 2-D uint8 or uint16 array as a grey PNG (parent directories are created)."""
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise InputError(f"expected a 2-D uint8/uint16 array, got {arr.dtype} {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path)  # uint8 -> "L", uint16 -> "I;16"
