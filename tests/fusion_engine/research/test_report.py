"""The evaluation report: artefact measures, target checks, shortfall sentences."""

from __future__ import annotations

import numpy as np

from fusion_engine.research.report import (
    AIR_MARGIN,
    Report,
    air_mask,
    artefacts,
    render_markdown,
    shortfalls,
)


def _head(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    ct = np.where(disk, 90, 0).astype(np.uint8)
    mr = np.where(disk, 150, 0).astype(np.uint8)
    return ct, mr


def test_air_mask_keeps_away_from_tissue() -> None:
    ct, mr = _head()
    air = air_mask(ct, mr)
    assert air[0, 0] and not air[32, 32]
    tissue = (ct > 0) | (mr > 0)
    rows = np.flatnonzero(tissue.any(axis=1))
    # the band of AIR_MARGIN pixels next to the head is not air
    assert not air[rows[0] - AIR_MARGIN, 32] and air[rows[0] - AIR_MARGIN - 1, 32]


def test_artefacts_raised_background_and_overshoot() -> None:
    ct, mr = _head()
    fused = np.maximum(ct, mr)
    clean = artefacts(ct, mr, fused)
    assert clean == {"air": 0.0, "overshoot": 0.0}
    raised = artefacts(ct, mr, (fused + 19).astype(np.uint8))
    assert raised["air"] == 19.0
    ringing = fused.copy()
    ringing[30:34, 30:34] = 230  # brighter than both sources there by far
    ringing[5, 5] = 20  # a speck in the air, beyond the sources' range + 10
    out = artefacts(ct, mr, ringing)
    assert out["overshoot"] == 100.0 * 17 / ct.size
    assert 0.0 < out["air"] < 1.0


def _report() -> Report:
    metrics = ["AG", "SF", "EN", "SSIM", "Qabf", "VIFF"]

    def col(v: float) -> dict[str, list[float]]:
        return {k: [v, v + 0.01] for k in [*metrics, "air", "overshoot"]}

    scores = {
        "learned-fusion": col(0.5),
        "addition": col(0.4),
        "pixel-average": col(0.3),
        "pixel-maximum": col(0.3),
        "u2fusion": col(0.2),
    }
    scores["pixel-maximum"]["VIFF"] = [0.7, 0.72]
    scores["pixel-maximum"]["AG"] = [0.9, 0.9]
    scores["u2fusion"]["EN"] = [0.9, 0.9]
    scores["u2fusion"]["air"] = [19.0, 19.5]
    groups = {"addition": "network", "u2fusion": "peer", "pixel-maximum": "baseline"}
    return Report(list(scores), metrics, ["p1", "p2"], scores, "learned-fusion", groups)


def test_target_checks_follow_the_issue() -> None:
    checks = _report().target_checks()
    assert checks == {
        "Qabf: default ranks first of all 5 methods": True,
        "VIFF: default ranks first of all 5 methods": False,
        "EN: default ranks first of all 5 methods": False,
        "AG: default at least the pixel maximum's": False,
        "SF: default at least the pixel maximum's": True,
        "SSIM: default at least the pixel average's - 0.01": True,
        "air stays black: mean grey level of the air <= 1": True,
    }


def test_shortfalls_name_the_methods_ahead() -> None:
    text = shortfalls(_report())
    assert [t.split(":")[0] for t in text] == ["VIFF", "EN", "AG"]
    assert "`pixel-maximum` 0.710" in text[0]
    assert "`u2fusion` 0.90" in text[1]


def test_markdown_has_tables_targets_and_peers() -> None:
    md = render_markdown(_report(), "Title", {"u2fusion": "U2Fusion"})
    assert md.startswith("# Title")
    assert "| air |" in md and "19.25" in md
    assert "Peers (published models, their released weights): u2fusion." in md
    assert "- [ ] VIFF: default ranks first" in md and "- [x] Qabf" in md
    assert "- `u2fusion` (peer): U2Fusion" in md
