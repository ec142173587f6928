"""Synthetic AANLIB-like CT/MR pairs for fusion-engine tests (a plain helper module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_pairs(
    root: Path, cases: tuple[str, ...] = ("11", "12", "13"), per_case: int = 2, size: int = 48
) -> Path:
    """AANLIB-like tree root/aanlib-ct-mri/{CT,MRI}/CASE+SSS.png of synthetic head-like images.

    A CT with a bright skull ring around grey brain, an MR with textured brain inside it;
    black air around both. Returns ``root``.
    """
    rng = np.random.default_rng(42)
    base = root / "aanlib-ct-mri"
    for sub in ("CT", "MRI"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in cases:
        for s in range(per_case):
            r = size / 3 + s
            disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
            ct = np.where(disk < r**2, 60, 0) + np.where(abs(np.sqrt(disk) - r) < 2, 190, 0)
            mr = np.where(disk < (r - 2) ** 2, 120 + 60 * rng.random((size, size)), 0)
            Image.fromarray(ct.clip(0, 255).astype(np.uint8)).save(base / "CT" / f"{c}{s:03d}.png")
            Image.fromarray(mr.clip(0, 255).astype(np.uint8)).save(base / "MRI" / f"{c}{s:03d}.png")
    return root
