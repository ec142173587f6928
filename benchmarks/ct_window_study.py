"""CT window study behind ``DEFAULT_CT_WINDOW`` (see docs/fusion_engine.md).

Windows the MRI-DIR phantom CT (slices 60, 100, 140) with several (center, width) windows and
prints entropy and average gradient of the windowed CT, the share of body pixels clipped high
and low, the fat/muscle contrast and the tissue/cortical-bone edge contrast in output units;
writes a montage (rows = windows, columns = slices) to look at.

Usage: ``python benchmarks/ct_window_study.py [--data ../shared/data] [--out runs/ctwindow]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from fusion_engine.intensity import ct_to_unit, unit_to_uint8
from fusion_engine.research.data import default_data_root, read_dicom_series
from fusion_engine.research.metrics import ag, en

WINDOWS = [(40, 80), (40, 400), (60, 600), (100, 1000), (300, 1500), (400, 2000)]
SLICES = [60, 100, 140]


def main() -> None:
    """Run the study."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--out", type=Path, default=Path("runs/ctwindow"))
    args = p.parse_args()
    vol = read_dicom_series(args.data / "mridir-phantom" / "ct")
    print("window      entropy  AG  clipped-high% clipped-low% soft-tissue bone-edge")
    rows = []
    for c, w in WINDOWS:
        ens, ags, hi, lo, tiles = [], [], [], [], []
        for k in SLICES:
            hu = vol[k]
            body = hu > -300
            u = ct_to_unit(hu, (c, w))
            u8 = unit_to_uint8(u)
            ens.append(en(u8.astype(float)))
            ags.append(ag(u8.astype(float)))
            hi.append(float((u[body] >= 1).mean()))
            lo.append(float((u[body] <= 0).mean()))
            tiles.append(u8)
        rows.append(np.concatenate(tiles, 1))
        soft = min(150 / w, 1.0)
        edge = (min(1000, c + w / 2) - max(50, c - w / 2)) / w
        print(
            f"{c:>4},{w:<5} {np.mean(ens):7.2f} {np.mean(ags):5.2f} {100 * np.mean(hi):8.1f}"
            f" {100 * np.mean(lo):12.1f} {soft:11.3f} {edge:9.3f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    img = np.concatenate(rows, 0)
    Image.fromarray(img).resize((img.shape[1] // 3, img.shape[0] // 3)).save(
        args.out / "windows.png"
    )
    print(f"montage: {args.out / 'windows.png'}")


if __name__ == "__main__":
    main()
