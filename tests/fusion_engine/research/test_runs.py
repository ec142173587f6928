"""The shared training loop: validation rows, best/last checkpoints, time budget, seeding."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusion_engine.research.runs import Schedule, Stage, run, seed_everything


def _stage(rng: np.random.Generator, val_losses: list[float]) -> Stage:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> dict[str, float]:
        x = torch.from_numpy(rng.random((4, 2), dtype=np.float32))
        loss = ((model(x) - 1.0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), "extra": 1.0}

    return Stage(
        name="toy",
        model=model,
        optimizer=opt,
        step=step,
        validate=lambda: {"val_loss": val_losses.pop(0)},
        state=lambda: {k: v.detach().clone() for k, v in model.state_dict().items()},
        images_per_step=4,
        fields=("extra",),
    )


def test_rows_checkpoints_and_best(tmp_path: Path) -> None:
    rng = seed_everything(0)
    res = run(_stage(rng, [3.0, 1.0, 2.0]), Schedule(6, 2), tmp_path, {}, rng, progress=False)
    assert res.steps == 6 and res.best["step"] == 4 and res.best["val_loss"] == 1.0
    rows = list(csv.DictReader((tmp_path / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(float(r["extra"]) == 1.0 and float(r["img_per_s"]) > 0 for r in rows)
    assert torch.load(tmp_path / "best.pt", weights_only=False)["step"] == 4
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 6
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "done step=6" in (tmp_path / "train.log").read_text()


def test_time_budget_stops_with_a_checkpoint(tmp_path: Path) -> None:
    rng = seed_everything(0)
    sched = Schedule(steps=1000, val_every=500, time_budget_s=0.0)
    res = run(_stage(rng, [1.0]), sched, tmp_path, {}, rng, progress=False)
    assert res.steps == 1
    assert "time budget reached at step 1" in (tmp_path / "train.log").read_text()
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 1


def test_seed_everything_is_reproducible() -> None:
    a = seed_everything(5).random(3), torch.rand(3)
    b = seed_everything(5).random(3), torch.rand(3)
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])
