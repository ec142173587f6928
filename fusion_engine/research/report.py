"""The evaluation report: tables, paired tests, the quality target, CSV files, image grids.

All eight metrics are "higher is better". Two artefact measures are reported beside them,
both "lower is better": the mean grey level of the air (is the background still black?) and
the share of pixels outside the sources' local range (halos, ringing, overshoot).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

PAPER_TABLE2: dict[str, float] = {
    "AG": 4.68,
    "SF": 13.21,
    "EN": 4.60,
    "MI": 1.87,
    "PSNR": 19.65,
    "SSIM": 0.772,
    "Qabf": 0.536,
    "VIFF": 0.518,
}
"""Scores the paper reports for its method (Chen et al. 2024, 40 AANLIB pairs)."""

TARGET_FIRST = ("Qabf", "VIFF", "EN")
"""The default must rank first of all methods on each of these at the same time."""

TARGET_AT_LEAST_MAX = ("AG", "SF")
"""The default must score at least the pixel maximum's mean on these."""

SSIM_SLACK = 0.01
"""The default's SSIM may lie at most this much below the pixel average's."""

AIR_LEVEL = 5
"""Grey level (of 255) at or below which a source pixel counts as dark."""

AIR_MARGIN = 3
"""Pixels kept away from anything brighter than AIR_LEVEL in either source (edge blur)."""

AIR_BLACK = 1.0
"""Largest mean grey level of the air that still counts as black."""

OVERSHOOT_LEVELS = 10
"""A fused pixel more than this many grey levels outside its sources' local range counts."""

ARTEFACTS = ("air", "overshoot")
"""Artefact measures (lower is better): air mean grey level, overshoot in % of pixels."""

MAXIMUM = "pixel-maximum"
AVERAGE = "pixel-average"

Grey = npt.NDArray[np.uint8]


def air_mask(ct: Grey, mr: Grey) -> npt.NDArray[np.bool_]:
    """Pixels dark in both sources and at least AIR_MARGIN pixels from anything brighter."""
    tissue = (ct > AIR_LEVEL) | (mr > AIR_LEVEL)
    near = ndimage.binary_dilation(tissue, iterations=AIR_MARGIN)
    return np.asarray(~near)


def artefacts(ct: Grey, mr: Grey, fused: Grey) -> dict[str, float]:
    """Air mean grey level and overshoot (% of pixels beyond the 3 x 3 source range +- 10)."""
    air = air_mask(ct, mr)
    a, b, f = (x.astype(np.float64) for x in (ct, mr, fused))
    hi = ndimage.maximum_filter(np.maximum(a, b), size=3) + OVERSHOOT_LEVELS
    lo = ndimage.minimum_filter(np.minimum(a, b), size=3) - OVERSHOOT_LEVELS
    return {
        "air": float(f[air].mean()) if air.any() else 0.0,
        "overshoot": 100.0 * float(np.mean((f > hi) | (f < lo))),
    }


@dataclass
class Report:
    """Evaluation result: per-pair scores per method, groups, summary statistics, files."""

    methods: list[str]
    metrics: list[str]
    names: list[str]
    scores: dict[str, dict[str, list[float]]]  # method -> metric or artefact -> per pair
    default: str
    groups: dict[str, str] = field(default_factory=dict)  # method -> network/baseline/peer
    markdown: str = ""
    files: list[Path] = field(default_factory=list)

    def mean(self, method: str, metric: str) -> float:
        """Mean over the pairs."""
        return float(np.mean(self.scores[method][metric]))

    def sd(self, method: str, metric: str) -> float:
        """Sample standard deviation over the pairs (0 for a single pair)."""
        v = self.scores[method][metric]
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def rank(self, method: str, metric: str) -> int:
        """1-based rank of ``method`` by mean (higher is better for all eight metrics)."""
        mine = self.mean(method, metric)
        return 1 + sum(self.mean(m, metric) > mine for m in self.methods if m != method)

    def p_value(self, other: str, metric: str) -> float:
        """Two-sided paired t-test p-value of the default against ``other`` (nan if n < 2)."""
        from scipy import stats

        a = np.asarray(self.scores[self.default][metric])
        b = np.asarray(self.scores[other][metric])
        if a.size < 2 or np.allclose(a, b):
            return float("nan") if a.size < 2 else 1.0
        with warnings.catch_warnings():  # near-identical columns: scipy warns, p stays valid
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(stats.ttest_rel(a, b).pvalue)

    def target_checks(self) -> dict[str, bool]:
        """The quality target, item by item (items whose reference is absent skip)."""
        d = self.default
        out: dict[str, bool] = {}
        for m in TARGET_FIRST:
            out[f"{m}: default ranks first of all {len(self.methods)} methods"] = (
                self.rank(d, m) == 1
            )
        if MAXIMUM in self.methods:
            for m in TARGET_AT_LEAST_MAX:
                out[f"{m}: default at least the pixel maximum's"] = self.mean(d, m) >= self.mean(
                    MAXIMUM, m
                )
        if AVERAGE in self.methods:
            out[f"SSIM: default at least the pixel average's - {SSIM_SLACK}"] = (
                self.mean(d, "SSIM") >= self.mean(AVERAGE, "SSIM") - SSIM_SLACK
            )
        if "air" in self.scores[d]:
            out[f"air stays black: mean grey level of the air <= {AIR_BLACK:g}"] = (
                self.mean(d, "air") <= AIR_BLACK
            )
        return out


def shortfalls(report: Report) -> list[str]:
    """One plain sentence per missed target item: which methods score higher, by how much."""
    d = report.default
    lines = []
    refs = {m: (MAXIMUM,) for m in TARGET_AT_LEAST_MAX}
    for metric in (*TARGET_FIRST, *TARGET_AT_LEAST_MAX):
        pool = refs.get(metric, tuple(report.methods))
        ahead = [
            m
            for m in pool
            if m != d and m in report.methods and report.mean(m, metric) > report.mean(d, metric)
        ]
        if not ahead:
            continue
        ahead.sort(key=lambda m: -report.mean(m, metric))
        parts = [
            f"`{m}` {_fmt(report.mean(m, metric), metric)} "
            f"(p = {_fmt_p(report.p_value(m, metric))})"
            for m in ahead
        ]
        lines.append(
            f"{metric}: `{d}` scores {_fmt(report.mean(d, metric), metric)}, "
            f"below {', '.join(parts)}."
        )
    return lines


def _fmt(x: float, metric: str) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if metric in ("SSIM", "Qabf", "VIFF") else f"{x:.2f}"


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _table(report: Report, rows: Sequence[str], best: str) -> list[str]:
    """Rows ``rows`` x columns methods, mean +- sd, the best mean in bold (max or min)."""
    peers = [m for m in report.methods if report.groups.get(m) == "peer"]
    header = ["", *report.methods] + (["paper (Table 2)"] if best == "max" else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in rows:
        means = [report.mean(m, metric) for m in report.methods]
        top = max(means) if best == "max" else min(means)
        cells = []
        for m, mean in zip(report.methods, means, strict=True):
            cell = f"{_fmt(mean, metric)} ± {_fmt(report.sd(m, metric), metric)}"
            cells.append(f"**{cell}**" if mean == top else cell)
        paper = [_fmt(PAPER_TABLE2.get(metric, math.nan), metric)] if best == "max" else []
        lines.append(f"| {metric} | " + " | ".join(cells + paper) + " |")
    if peers and best == "max":
        lines += ["", f"Peers (published models, their released weights): {', '.join(peers)}."]
    return lines


def render_markdown(report: Report, title: str, descriptions: dict[str, str]) -> str:
    """Markdown: score table, artefact table, p-values, methods, target checks, shortfalls."""
    d = report.default
    lines = [
        f"# {title}",
        "",
        f"{len(report.names)} pairs; default strategy: `{d}`; "
        "all metrics higher is better; **bold** = best mean.",
        "",
        *_table(report, report.metrics, "max"),
    ]
    if all(a in report.scores[d] for a in ARTEFACTS):
        lines += [
            "",
            "Artefacts (lower is better): `air` = mean grey level where both sources are dark "
            f"(<= {AIR_LEVEL}, {AIR_MARGIN} px from tissue); `overshoot` = % of pixels more than "
            f"{OVERSHOOT_LEVELS} grey levels outside the 3x3 range of both sources.",
            "",
            *_table(report, ARTEFACTS, "min"),
        ]
    others = [m for m in report.methods if m != d]
    lines += ["", f"Paired t-test p-values, `{d}` against each method:", ""]
    lines.append("| metric | rank of default | " + " | ".join(others) + " |")
    lines.append("|" + "---|" * (len(others) + 2))
    for metric in report.metrics:
        ps = [_fmt_p(report.p_value(o, metric)) for o in others]
        lines.append(f"| {metric} | {report.rank(d, metric)} | " + " | ".join(ps) + " |")
    lines += ["", "Methods:", ""]
    lines += [
        f"- `{m}` ({report.groups.get(m, '?')}): {descriptions.get(m, '')}" for m in report.methods
    ]
    lines += ["", "Quality target:", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in report.target_checks().items()]
    missed = shortfalls(report)
    if missed:
        lines += ["", "Where the default falls short:", "", *[f"- {t}" for t in missed]]
    lines.append("")
    return "\n".join(lines)


def write_csv(report: Report, path: Path) -> None:
    """Summary CSV: one row per metric, mean and sd columns per method, p-values vs default."""
    others = [m for m in report.methods if m != report.default]
    rows = [*report.metrics, *(a for a in ARTEFACTS if a in report.scores[report.default])]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "metric",
                *[f"{m} mean" for m in report.methods],
                *[f"{m} sd" for m in report.methods],
                *[f"p {report.default} vs {m}" for m in others],
                "paper",
            ]
        )
        for metric in rows:
            w.writerow(
                [
                    metric,
                    *[f"{report.mean(m, metric):.6g}" for m in report.methods],
                    *[f"{report.sd(m, metric):.6g}" for m in report.methods],
                    *[f"{report.p_value(m, metric):.6g}" for m in others],
                    PAPER_TABLE2.get(metric, ""),
                ]
            )


def write_pairs_csv(report: Report, path: Path) -> None:
    """Per-pair CSV: name, method, the eight metrics and the artefact measures."""
    cols = [*report.metrics, *(a for a in ARTEFACTS if a in report.scores[report.default])]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "method", *cols])
        for m in report.methods:
            for i, name in enumerate(report.names):
                w.writerow([name, m, *[f"{report.scores[m][k][i]:.6g}" for k in cols]])


def write_grid(
    path: Path,
    names: Sequence[str],
    images: Mapping[str, Sequence[Grey]],
    rows: Sequence[int],
    zoom: tuple[slice, slice] | None = None,
) -> None:
    """PNG grid: one row per pair, one column per entry of ``images`` (CT, MR, methods).

    With ``zoom`` every image is cut to that window and shown enlarged (pixels as blocks),
    to look for halos, ringing and checkerboard texture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(images)
    size = 2.4 if zoom else 1.9
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(size * len(cols), (size + 0.1) * len(rows)), squeeze=False
    )
    for r, i in enumerate(rows):
        for c, title in enumerate(cols):
            img = images[title][i]
            ax = axes[r][c]
            ax.imshow(
                img[zoom] if zoom else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(names[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
