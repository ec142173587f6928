"""Table-2 style evaluation: every network strategy against classical baselines and peers.

For each CT/MR pair, every method's result is rounded to 8 bit (as fused images are saved and
as the golden metric values were computed) and scored with the eight metrics of
:mod:`fusion_engine.research.metrics` and the artefact measures of
:mod:`fusion_engine.research.report`. Methods:

* network strategies: the learned fusion stage and every hand-made rule;
* classical baselines: pixel average, pixel maximum, Laplacian pyramid, DWT;
* peers: the published models' outputs on the same pairs (``peer-fusions/<peer>/<name>.png``,
  see ``../shared/data/peer-fusions/README.md``), read as they are.

The report gives mean +- sd per metric and method, the rank of the default strategy, paired
t-test p-values of the default against each other method, the quality target item by item,
and two image grids (whole images, and an enlarged window to look for halos and texture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fusion_engine.defaults import DEFAULT_STRATEGY, LEARNED_STRATEGY
from fusion_engine.errors import InputError
from fusion_engine.research.report import ARTEFACTS, Report, artefacts, render_markdown

BASELINE_METHODS: dict[str, str] = {
    "pixel-average": "average",
    "pixel-maximum": "max",
    "laplacian-pyramid": "laplacian",
    "dwt": "dwt",
}
"""Report column name -> :func:`fusion_engine.research.baselines.fuse_baseline` name."""

PEERS: dict[str, str] = {
    "ifcnn-max": "IFCNN-MAX (Zhang et al., Information Fusion 2020)",
    "emfusion": "EMFusion (Xu and Ma, Information Fusion 2021)",
    "densefuse": "DenseFuse, addition (Li and Wu, IEEE TIP 2019)",
    "u2fusion": "U2Fusion (Xu et al., IEEE TPAMI 2022)",
}
"""Peer folder name -> description; their outputs are read from the peers folder."""

GRID_METHODS = (
    LEARNED_STRATEGY,
    "mean-attention",
    "mean-attention-paper",
    "pixel-maximum",
    "laplacian-pyramid",
)
"""Methods shown in the grids besides the default and the peers."""

ZOOM = (slice(64, 160), slice(80, 176))
"""Window of the enlarged grid (rows, cols) on 256 x 256 AANLIB images: skull and cortex."""

Grey = npt.NDArray[np.uint8]
FuseFn = Callable[..., npt.NDArray[np.float32]]


def _to_uint8_grey(arr: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> Grey:
    if arr.dtype == np.uint16:
        return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    return arr.astype(np.uint8)


def _fuse_network(
    strategy: str, ct8: Sequence[Grey], mr8: Sequence[Grey], fuse: FuseFn, device: str
) -> list[Grey]:
    """One network strategy over every pair (as one stack when the sizes agree)."""
    from fusion_engine.intensity import unit_to_uint8

    if len({a.shape for a in (*ct8, *mr8)}) == 1:
        ct_u = np.stack(ct8).astype(np.float32) / 255.0
        mr_u = np.stack(mr8).astype(np.float32) / 255.0
        return [unit_to_uint8(r) for r in fuse(ct_u, mr_u, strategy=strategy, device=device)]
    return [
        unit_to_uint8(
            fuse(a / np.float32(255), b / np.float32(255), strategy=strategy, device=device)
        )
        for a, b in zip(ct8, mr8, strict=True)
    ]


def _fuse_baseline(name: str, ct8: Sequence[Grey], mr8: Sequence[Grey]) -> list[Grey]:
    from fusion_engine.research import baselines

    return [
        baselines.to_uint8(
            baselines.fuse_baseline(name, a.astype(np.float64), b.astype(np.float64))
        )
        for a, b in zip(ct8, mr8, strict=True)
    ]


def read_peers(
    peers_dir: Path, names: Sequence[str], shape: tuple[int, ...]
) -> dict[str, list[Grey]]:
    """Each peer's fused images of ``names``; a peer lacking one of them is left out."""
    from fusion_engine.research.data import read_grey_png

    out: dict[str, list[Grey]] = {}
    for peer in PEERS:
        files = [peers_dir / peer / f"{n}.png" for n in names]
        if all(f.is_file() for f in files):
            images = [_to_uint8_grey(read_grey_png(f)) for f in files]
            if any(im.shape != shape for im in images):
                raise InputError(f"{peers_dir / peer}: image size differs from the pairs'")
            out[peer] = images
    return out


def _score(
    ct8: Sequence[Grey], mr8: Sequence[Grey], fused: Sequence[Grey]
) -> dict[str, list[float]]:
    """The eight metrics and the artefact measures of one method, per pair."""
    from fusion_engine.research.metrics import METRIC_NAMES, all_metrics

    scores: dict[str, list[float]] = {k: [] for k in (*METRIC_NAMES, *ARTEFACTS)}
    for a, b, f in zip(ct8, mr8, fused, strict=True):
        vals = all_metrics(a.astype(np.float64), b.astype(np.float64), f.astype(np.float64))
        vals.update(artefacts(a, b, f))
        for k, v in vals.items():
            scores[k].append(float(v))
    return scores


def _descriptions(methods: Sequence[str]) -> dict[str, str]:
    from fusion_engine.model import FUSION_STRATEGIES, FusionLayer

    out = {m: PEERS[m] for m in methods if m in PEERS}
    out |= {
        m: f"classical baseline `{BASELINE_METHODS[m]}`" for m in methods if m in BASELINE_METHODS
    }
    rules: dict[str, object] = {**FUSION_STRATEGIES, LEARNED_STRATEGY: FusionLayer}
    for m in methods:
        if m in rules:
            doc = (getattr(rules[m], "__doc__", None) or "").strip()
            out[m] = doc.splitlines()[0] if doc else ""
    return out


def _write_files(
    report: Report, out_dir: Path, images: dict[str, list[Grey]], grid_pairs: int
) -> None:
    from fusion_engine.research.report import write_csv, write_grid, write_pairs_csv

    md, summary, per_pair = out_dir / "report.md", out_dir / "summary.csv", out_dir / "pairs.csv"
    md.write_text(report.markdown)
    write_csv(report, summary)
    write_pairs_csv(report, per_pair)
    report.files += [md, summary, per_pair]
    n = max(0, min(grid_pairs, len(report.names)))
    if not n:
        return
    rows = [round(float(x)) for x in np.linspace(0, len(report.names) - 1, n)]
    shown = [report.default, *(m for m in GRID_METHODS if m != report.default)]
    shown += [m for m in report.methods if report.groups.get(m) == "peer"]
    cols = {k: images[k] for k in ("CT", "MR", *shown) if k in images}
    write_grid(out_dir / "grid.png", report.names, cols, rows)
    report.files.append(out_dir / "grid.png")
    h, w = images["CT"][0].shape
    if h >= ZOOM[0].stop and w >= ZOOM[1].stop:
        write_grid(out_dir / "grid_zoom.png", report.names, cols, rows, ZOOM)
        report.files.append(out_dir / "grid_zoom.png")


def evaluate(
    pairs_dir: Path,
    out_dir: Path,
    *,
    cases: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    default: str = DEFAULT_STRATEGY,
    device: str = "auto",
    grid_pairs: int = 4,
    peers_dir: Path | None = None,
    fuse_fn: FuseFn | None = None,
) -> Report:
    """Fuse every pair with every strategy and baseline, read the peers, score, write files.

    Writes ``report.md``, ``summary.csv``, ``pairs.csv``, ``grid.png`` and ``grid_zoom.png``
    into ``out_dir``. ``peers_dir`` holds ``<peer>/<name>.png`` (None: no peers); ``fuse_fn``
    replaces :func:`fusion_engine.inference.fuse` (tests).
    """
    from fusion_engine.inference import STRATEGIES, fuse
    from fusion_engine.research.data import list_pairs, read_grey_png

    net = list(strategies) if strategies is not None else list(STRATEGIES)
    if default not in net:
        raise InputError(f"default strategy {default!r} is not among {net}")
    net = [default] + [s for s in net if s != default]
    pairs = list_pairs(pairs_dir, set(cases) if cases else None)
    if not pairs:
        raise InputError(f"no CT/MRI pairs in {pairs_dir} (cases {cases})")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in pairs]
    ct8 = [_to_uint8_grey(read_grey_png(p.ct)) for p in pairs]
    mr8 = [_to_uint8_grey(read_grey_png(p.mr)) for p in pairs]
    fused: dict[str, list[Grey]] = {
        s: _fuse_network(s, ct8, mr8, fuse_fn or fuse, device) for s in net
    }
    groups = dict.fromkeys(net, "network")
    for col, name in BASELINE_METHODS.items():
        fused[col], groups[col] = _fuse_baseline(name, ct8, mr8), "baseline"
    if peers_dir is not None:
        for peer, images in read_peers(peers_dir, names, ct8[0].shape).items():
            fused[peer], groups[peer] = images, "peer"
    methods = list(fused)
    scores = {m: _score(ct8, mr8, fused[m]) for m in methods}
    from fusion_engine.research.metrics import METRIC_NAMES

    report = Report(methods, list(METRIC_NAMES), names, scores, default, groups)
    title = "Fusion evaluation" + (f" (cases {', '.join(cases)})" if cases else "")
    report.markdown = render_markdown(report, title, _descriptions(methods))
    _write_files(report, out_dir, {"CT": ct8, "MR": mr8, **fused}, grid_pairs)
    return report
