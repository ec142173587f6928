"""Table-2 style evaluation: every network strategy against classical baselines.

For each CT/MR pair, every method's result is rounded to 8 bit (as fused images are saved and
as the golden metric values were computed) and scored with the eight metrics of
:mod:`fusion_engine.research.metrics`. The report gives mean +- sd per metric and method,
the rank of the default strategy, paired t-test p-values of the default against each other
method, the paper's Table 2 figures for reference and an example PNG grid.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fusion_engine.defaults import DEFAULT_STRATEGY
from fusion_engine.errors import InputError

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

BASELINE_METHODS: dict[str, str] = {
    "pixel-average": "average",
    "pixel-maximum": "max",
    "laplacian-pyramid": "laplacian",
    "dwt": "dwt",
}
"""Report column name -> :func:`fusion_engine.research.baselines.fuse_baseline` name."""

TARGET_FIRST = ("Qabf", "VIFF")
TARGET_ABOVE_NETWORK = ("AG", "SF", "EN")


@dataclass
class Report:
    """Evaluation result: per-pair scores, summary statistics and the written files."""

    methods: list[str]
    metrics: list[str]
    names: list[str]
    scores: dict[str, dict[str, list[float]]]  # method -> metric -> per pair
    default: str
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
        return float(stats.ttest_rel(a, b).pvalue)

    def target_checks(self, network_methods: Sequence[str]) -> dict[str, bool]:
        """The issue's quality target, item by item."""
        out: dict[str, bool] = {}
        for m in TARGET_FIRST:
            out[f"{m}: default ranks first of all methods"] = self.rank(self.default, m) == 1
        others = [x for x in network_methods if x != self.default] + ["pixel-average"]
        for m in TARGET_ABOVE_NETWORK:
            d = self.mean(self.default, m)
            out[f"{m}: default above pixel average and other network strategies"] = all(
                d > self.mean(o, m) for o in others if o in self.methods
            )
        return out


def shortfalls(report: Report, network_methods: Sequence[str]) -> list[str]:
    """One plain sentence per missed target item: which methods score higher, by how much."""
    d = report.default
    lines = []
    others_net = [x for x in network_methods if x != d] + ["pixel-average"]
    for metric in (*TARGET_FIRST, *TARGET_ABOVE_NETWORK):
        pool = report.methods if metric in TARGET_FIRST else others_net
        ahead = [
            m
            for m in pool
            if m != d and m in report.methods and report.mean(m, metric) >= report.mean(d, metric)
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


def render_markdown(report: Report, network_methods: Sequence[str], title: str) -> str:
    """Markdown: mean +- sd table (rows metrics, columns methods), p-values, target checks."""
    d = report.default
    lines = [
        f"# {title}",
        "",
        f"{len(report.names)} pairs; default strategy: `{d}`; "
        "all metrics higher is better; **bold** = best mean.",
        "",
    ]
    header = ["metric", *report.methods, "paper (Table 2)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for metric in report.metrics:
        best = max(report.mean(m, metric) for m in report.methods)
        cells = []
        for m in report.methods:
            mean, sd = report.mean(m, metric), report.sd(m, metric)
            cell = f"{_fmt(mean, metric)} ± {_fmt(sd, metric)}"
            cells.append(f"**{cell}**" if mean == best else cell)
        paper = PAPER_TABLE2.get(metric, float("nan"))
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {_fmt(paper, metric)} |")
    lines += ["", f"Paired t-test p-values, `{d}` against each method:", ""]
    others = [m for m in report.methods if m != d]
    lines.append("| metric | rank of default | " + " | ".join(others) + " |")
    lines.append("|" + "---|" * (len(others) + 2))
    for metric in report.metrics:
        ps = [_fmt_p(report.p_value(o, metric)) for o in others]
        lines.append(f"| {metric} | {report.rank(d, metric)} | " + " | ".join(ps) + " |")
    from fusion_engine.model import FUSION_STRATEGIES

    lines += ["", "Methods:", ""]
    for m in report.methods:
        fn = FUSION_STRATEGIES.get(m)
        if fn is not None:
            doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            lines.append(f"- `{m}` (network): {doc}")
        else:
            lines.append(f"- `{m}`: classical baseline (`fusion_engine.research.baselines`)")
    lines += ["", "Quality target:", ""]
    for text, ok in report.target_checks(network_methods).items():
        lines.append(f"- [{'x' if ok else ' '}] {text}")
    missed = shortfalls(report, network_methods)
    if missed:
        lines += ["", "Where the default falls short:", ""]
        lines += [f"- {text}" for text in missed]
    lines.append("")
    return "\n".join(lines)


def write_csv(report: Report, path: Path) -> None:
    """Summary CSV: one row per metric, mean and sd columns per method, p-values vs default."""
    others = [m for m in report.methods if m != report.default]
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
        for metric in report.metrics:
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
    """Per-pair CSV: name, method, the eight metrics."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "method", *report.metrics])
        for m in report.methods:
            for i, name in enumerate(report.names):
                w.writerow([name, m, *[f"{report.scores[m][k][i]:.6g}" for k in report.metrics]])


def write_grid(
    path: Path,
    names: Sequence[str],
    ct: Sequence[npt.NDArray[np.uint8]],
    mr: Sequence[npt.NDArray[np.uint8]],
    fused: dict[str, list[npt.NDArray[np.uint8]]],
    rows: Sequence[int],
) -> None:
    """PNG grid: one row per pair (CT, MR, each method's 8-bit result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["CT", "MR", *fused]
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(1.9 * len(cols), 2.0 * len(rows)), squeeze=False
    )
    for r, i in enumerate(rows):
        images = [ct[i], mr[i], *[fused[m][i] for m in fused]]
        for c, (title, img) in enumerate(zip(cols, images, strict=True)):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(names[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _to_uint8_grey(arr: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> npt.NDArray[np.uint8]:
    if arr.dtype == np.uint16:
        return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    return arr.astype(np.uint8)


def evaluate(
    pairs_dir: Path,
    out_dir: Path,
    *,
    cases: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    default: str = DEFAULT_STRATEGY,
    device: str = "auto",
    grid_pairs: int = 4,
    progress: bool = True,
    fuse_fn: Callable[..., npt.NDArray[np.float32]] | None = None,
) -> Report:
    """Fuse every pair with every strategy and baseline, score, and write the report files.

    Writes ``report.md``, ``summary.csv``, ``pairs.csv`` and ``grid.png`` into ``out_dir``.
    ``fuse_fn`` replaces :func:`fusion_engine.inference.fuse` (tests).
    """
    from rich.progress import Progress

    from fusion_engine.inference import STRATEGIES, fuse
    from fusion_engine.intensity import unit_to_uint8
    from fusion_engine.research import baselines
    from fusion_engine.research.data import list_pairs, read_grey_png
    from fusion_engine.research.metrics import METRIC_NAMES, all_metrics

    net = list(strategies) if strategies is not None else list(STRATEGIES)
    if default not in net:
        raise InputError(f"default strategy {default!r} is not among {net}")
    net = [default] + [s for s in net if s != default]
    pairs = list_pairs(pairs_dir, set(cases) if cases else None)
    if not pairs:
        raise InputError(f"no CT/MRI pairs in {pairs_dir} (cases {cases})")
    out_dir.mkdir(parents=True, exist_ok=True)
    do_fuse = fuse_fn or fuse

    names = [p.name for p in pairs]
    ct8 = [_to_uint8_grey(read_grey_png(p.ct)) for p in pairs]
    mr8 = [_to_uint8_grey(read_grey_png(p.mr)) for p in pairs]
    shapes = {a.shape for a in ct8} | {b.shape for b in mr8}
    methods = [*net, *BASELINE_METHODS]
    fused: dict[str, list[npt.NDArray[np.uint8]]] = {m: [] for m in methods}
    with Progress(disable=not progress) as bar:
        task = bar.add_task("fusing", total=len(net) + len(BASELINE_METHODS) * len(pairs))
        for s in net:
            if len(shapes) == 1:
                ct_u = np.stack(ct8).astype(np.float32) / 255.0
                mr_u = np.stack(mr8).astype(np.float32) / 255.0
                res = do_fuse(ct_u, mr_u, strategy=s, device=device)
                fused[s] = [unit_to_uint8(r) for r in res]
            else:
                fused[s] = [
                    unit_to_uint8(
                        do_fuse(
                            a.astype(np.float32) / 255.0,
                            b.astype(np.float32) / 255.0,
                            strategy=s,
                            device=device,
                        )
                    )
                    for a, b in zip(ct8, mr8, strict=True)
                ]
            bar.advance(task)
        for col, name in BASELINE_METHODS.items():
            for a, b in zip(ct8, mr8, strict=True):
                f = baselines.fuse_baseline(name, a.astype(np.float64), b.astype(np.float64))
                fused[col].append(baselines.to_uint8(f))
                bar.advance(task)
        metrics = list(METRIC_NAMES)
        scores: dict[str, dict[str, list[float]]] = {m: {k: [] for k in metrics} for m in methods}
        task2 = bar.add_task("scoring", total=len(methods) * len(pairs))
        for m in methods:
            for i in range(len(pairs)):
                vals = all_metrics(
                    ct8[i].astype(np.float64),
                    mr8[i].astype(np.float64),
                    fused[m][i].astype(np.float64),
                )
                for k in metrics:
                    scores[m][k].append(float(vals[k]))
                bar.advance(task2)

    report = Report(methods, metrics, names, scores, default)
    title = "Fusion evaluation"
    if cases:
        title += f" (cases {', '.join(cases)})"
    report.markdown = render_markdown(report, net, title)
    md = out_dir / "report.md"
    md.write_text(report.markdown)
    summary, per_pair, grid = out_dir / "summary.csv", out_dir / "pairs.csv", out_dir / "grid.png"
    write_csv(report, summary)
    write_pairs_csv(report, per_pair)
    n_grid = max(0, min(grid_pairs, len(pairs)))
    if n_grid:
        rows = [round(float(x)) for x in np.linspace(0, len(pairs) - 1, n_grid)]
        write_grid(grid, names, ct8, mr8, fused, rows)
        report.files.append(grid)
    report.files[:0] = [md, summary, per_pair]
    return report
