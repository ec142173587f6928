"""Sweep of fusion rules over the shipped network's features, on the AANLIB training cases.

Usage: ``python scripts/strategy_sweep.py [--data ../shared/data] [--out FILE.md] [--every 2]``

Why it exists: the evaluation (``fusion-engine evaluate``) shows the default strategy first or
tied first on Q_abf but behind ``addition`` on VIFF. This script scores a family of rules
between "choose the stronger source" and "add both" on the *training* cases (so that the
validation cases stay untouched for the report) and prints the Q_abf / VIFF trade-off:
every rule that moves towards adding the weaker source gains VIFF and loses Q_abf.
Results are 8-bit rounded and scored as in the evaluation; pixel maximum and pixel average
are the classical references.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fusion_engine.inference import load_model
from fusion_engine.intensity import unit_to_uint8
from fusion_engine.model import FUSION_STRATEGIES, channel_mean
from fusion_engine.research import baselines
from fusion_engine.research.data import (
    DEFAULT_VAL_CASES,
    default_data_root,
    list_pairs,
    read_grey_png,
)
from fusion_engine.research.evaluate import _to_uint8_grey
from fusion_engine.research.metrics import all_metrics

Rule = Callable[[Tensor, Tensor], Tensor]
SHOWN = ("AG", "SF", "EN", "MI", "SSIM", "Qabf", "VIFF")


def _smooth(q: Tensor, k: int) -> Tensor:
    return F.avg_pool2d(F.pad(q, (k // 2,) * 4, mode="replicate"), k, 1)


def rules() -> dict[str, tuple[str, Rule]]:
    """Name -> (description, rule) of the swept fusion rules."""

    def choose(share: float) -> Rule:
        return lambda a, b: torch.where(
            channel_mean(a) >= channel_mean(b), a + share * b, b + share * a
        )

    def choose_smooth(k: int) -> Rule:
        return lambda a, b: torch.where(
            _smooth(channel_mean(a), k) >= _smooth(channel_mean(b), k), a, b
        )

    def elem_max(share: float) -> Rule:
        return lambda a, b: torch.maximum(a, b) + share * torch.minimum(a, b)

    def power(g: float) -> Rule:
        def f(a: Tensor, b: Tensor) -> Tensor:
            logits = (
                torch.cat(
                    [torch.log(channel_mean(a) + 1e-8), torch.log(channel_mean(b) + 1e-8)], dim=1
                )
                * g
            )
            w = torch.softmax(logits, dim=1)
            return w[:, 0:1] * a + w[:, 1:2] * b

        return f

    out: dict[str, tuple[str, Rule]] = {
        "choose (default)": ("per pixel the source with the larger channel mean", choose(0.0))
    }
    for s in (0.1, 0.25, 0.5):
        out[f"choose + {s:g} other"] = (f"the chosen source plus {s:g} x the other", choose(s))
    for k in (3, 5):
        out[f"choose, {k}x{k} activity"] = (
            f"choice on {k}x{k}-averaged channel means",
            choose_smooth(k),
        )
    for s in (0.0, 0.25, 0.5):
        out[f"element max + {s:g} min"] = (f"per feature max plus {s:g} x min", elem_max(s))
    for g in (2.0, 4.0, 8.0):
        out[f"weights Q^{g:g}"] = (f"paper's rule with weights Q_i^{g:g} / sum", power(g))
    out["paper (Q^1)"] = ("paper eqs. 2-3", FUSION_STRATEGIES["mean-attention-paper"])
    out["addition"] = ("sum of the features", FUSION_STRATEGIES["addition"])
    return out


def main() -> None:
    """Run the sweep and write a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default: print)")
    p.add_argument("--every", type=int, default=2, help="use every n-th training pair")
    args = p.parse_args()
    pairs = [q for q in list_pairs(args.data / "aanlib-ct-mri") if q.case not in DEFAULT_VAL_CASES][
        :: args.every
    ]
    ct8 = [_to_uint8_grey(read_grey_png(q.ct)) for q in pairs]
    mr8 = [_to_uint8_grey(read_grey_png(q.mr)) for q in pairs]
    net = load_model("cpu", "fp32").net

    def score(fused: list[np.ndarray]) -> dict[str, float]:
        vals = [
            all_metrics(a.astype(np.float64), b.astype(np.float64), f.astype(np.float64))
            for a, b, f in zip(ct8, mr8, fused, strict=True)
        ]
        return {k: float(np.mean([v[k] for v in vals])) for k in SHOWN}

    rows: dict[str, tuple[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for name, (doc, rule) in rules().items():
            fused = []
            for a, b in zip(ct8, mr8, strict=True):
                ta = torch.from_numpy(a.astype(np.float32) / 255.0)[None, None]
                tb = torch.from_numpy(b.astype(np.float32) / 255.0)[None, None]
                out = net.fuse(ta, tb, rule).clamp(0, 1)[0, 0].numpy()
                fused.append(unit_to_uint8(out))
            rows[name] = (doc, score(fused))
            print(name, {k: round(v, 3) for k, v in rows[name][1].items()}, flush=True)
    for name, kind in (("pixel maximum", "max"), ("pixel average", "average")):
        fused = [
            baselines.to_uint8(
                baselines.fuse_baseline(kind, a.astype(np.float64), b.astype(np.float64))
            )
            for a, b in zip(ct8, mr8, strict=True)
        ]
        rows[name] = ("classical baseline", score(fused))
    lines = [
        f"# Fusion-rule sweep on {len(pairs)} AANLIB training pairs",
        "",
        "Generated by `scripts/strategy_sweep.py`; means over the pairs, higher is better.",
        "",
        "| rule | " + " | ".join(SHOWN) + " | what |",
        "|---|" + "---|" * (len(SHOWN) + 1),
    ]
    for name, (doc, s) in rows.items():
        cells = [f"{s[k]:.3f}" if k in ("SSIM", "Qabf", "VIFF") else f"{s[k]:.2f}" for k in SHOWN]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {doc} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
