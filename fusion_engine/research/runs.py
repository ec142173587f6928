"""The training loop both stages share: steps, validation, checkpoints, loss curves, resume.

A stage supplies a model, an optimizer, one training step and a validation pass; :func:`run`
does the rest and writes into the run directory: ``last.pt`` (resumable: weights, optimizer,
step, elapsed time, random states), ``best.pt`` (best validation loss), ``loss.csv`` (one row
per validation), ``loss.png`` (the curves) and ``train.log``.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

BASE_FIELDS = ("step", "train_loss", "val_loss", "elapsed_s", "img_per_s")
"""Columns of ``loss.csv`` every stage writes; a stage adds its own after these."""


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, torch and a numpy generator (returned) for a reproducible run."""
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@dataclass
class Stage:
    """What a training stage gives the loop.

    ``step()`` runs one optimisation step and returns its loss terms (``"loss"`` first);
    ``validate()`` returns at least ``"val_loss"``; ``state()`` the weights to checkpoint.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], dict[str, float]]
    validate: Callable[[], dict[str, float]]
    state: Callable[[], dict[str, torch.Tensor]]
    images_per_step: int
    fields: Sequence[str] = ()
    ylabel: str = "loss"


@dataclass
class Schedule:
    """How long to train and how often to validate."""

    steps: int
    val_every: int
    time_budget_s: float | None = None


@dataclass
class Progress:
    """The loop's resumable state."""

    step: int = 0
    elapsed_before: float = 0.0
    best: dict[str, float] = field(default_factory=lambda: {"step": 0, "val_loss": float("inf")})


@dataclass
class RunResult:
    """Summary of a finished (or time-limited) run."""

    steps: int
    seconds: float
    best: dict[str, float]
    out: str


def _plot_curve(csv_path: Path, png_path: Path, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [float(r["train_loss"]) for r in rows], label="train", lw=1)
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class RunDir:
    """The files of a run directory: CSV rows, log lines, checkpoints, the plot."""

    def __init__(self, out: Path, stage: Stage, resume: bool) -> None:
        self.out = out
        self.stage = stage
        out.mkdir(parents=True, exist_ok=True)
        self.csv_path = out / "loss.csv"
        self.fields = [*BASE_FIELDS, *stage.fields]
        if not (resume and self.csv_path.is_file()):
            with self.csv_path.open("w", newline="") as fh:
                csv.writer(fh).writerow(self.fields)
        self._log: TextIO = (out / "train.log").open("a")

    def log(self, text: str) -> None:
        """Append a line to ``train.log``."""
        self._log.write(text.rstrip("\n") + "\n")
        self._log.flush()

    def close(self) -> None:
        """Close the log file."""
        self._log.close()

    def row(self, values: dict[str, float]) -> None:
        """Append a row to ``loss.csv`` (missing columns empty) and redraw ``loss.png``."""
        with self.csv_path.open("a", newline="") as fh:
            csv.writer(fh).writerow([values.get(k, "") for k in self.fields])
        _plot_curve(self.csv_path, self.out / "loss.png", self.stage.name, self.stage.ylabel)

    def save(self, name: str, content: dict[str, Any]) -> None:
        """Write a checkpoint atomically (temporary file, then rename)."""
        tmp = self.out / f"{name}.tmp"
        torch.save(content, tmp)
        tmp.replace(self.out / name)


def _resume(run_dir: RunDir, stage: Stage, rng: np.random.Generator) -> Progress:
    ck = torch.load(run_dir.out / "last.pt", map_location="cpu", weights_only=False)
    stage.model.load_state_dict(ck["model"], strict=False)
    stage.optimizer.load_state_dict(ck["optimizer"])
    rng.bit_generator.state = ck["np_rng"]
    torch.set_rng_state(ck["torch_rng"])
    return Progress(int(ck["step"]), float(ck["elapsed_s"]), dict(ck["best"]))


def _checkpoint(
    run_dir: RunDir,
    stage: Stage,
    prog: Progress,
    rng: np.random.Generator,
    config: dict[str, Any],
    val: dict[str, float],
    elapsed: float,
) -> None:
    """Keep ``best.pt`` on a better validation loss; always rewrite ``last.pt``."""
    state = stage.state()
    if val["val_loss"] < prog.best["val_loss"]:
        prog.best = {"step": prog.step, **val}
        run_dir.save("best.pt", {"model": state, "step": prog.step, "val": val, "config": config})
    run_dir.save(
        "last.pt",
        {
            "model": state,
            "optimizer": stage.optimizer.state_dict(),
            "step": prog.step,
            "val": val,
            "elapsed_s": elapsed,
            "best": prog.best,
            "np_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "config": config,
        },
    )


def run(
    stage: Stage,
    schedule: Schedule,
    out: Path,
    config: dict[str, Any],
    rng: np.random.Generator,
    *,
    resume: bool = False,
    description: Sequence[str] = (),
    progress: bool = True,
) -> RunResult:
    """Train ``stage`` until ``schedule.steps`` (or the time budget); validate and checkpoint
    every ``schedule.val_every`` steps and at the end; a progress bar unless ``progress`` is
    false."""
    from rich.progress import Progress as Bar

    run_dir = RunDir(out, stage, resume)
    prog = _resume(run_dir, stage, rng) if resume and (out / "last.pt").is_file() else Progress()
    run_dir.log(
        f"start {stage.name} step={prog.step} threads={torch.get_num_threads()} "
        f"config={json.dumps(config, default=str)}"
    )
    for line in description:
        run_dir.log(f"data: {line}")
    t0 = t_last = time.monotonic()
    terms: list[dict[str, float]] = []
    stage.model.train()
    bar = Bar(disable=not progress)
    task = bar.add_task(stage.name, total=schedule.steps, completed=prog.step)
    bar.start()
    while prog.step < schedule.steps:
        terms.append(stage.step())
        prog.step += 1
        bar.update(task, completed=prog.step)
        now = time.monotonic()
        elapsed = prog.elapsed_before + (now - t0)
        over = schedule.time_budget_s is not None and elapsed >= schedule.time_budget_s
        if prog.step % schedule.val_every and prog.step != schedule.steps and not over:
            continue
        stage.model.eval()
        with torch.no_grad():
            val = stage.validate()
        stage.model.train()
        means = {k: float(np.mean([t[k] for t in terms])) for k in terms[0]}
        speed = len(terms) * stage.images_per_step / max(now - t_last, 1e-9)
        row = {"step": prog.step, "train_loss": means.pop("loss"), **means, **val}
        run_dir.row({**row, "elapsed_s": elapsed, "img_per_s": speed})
        _checkpoint(run_dir, stage, prog, rng, config, val, elapsed)
        run_dir.log(
            f"step {prog.step} " + " ".join(f"{k} {v:.5g}" for k, v in row.items() if k != "step")
        )
        terms, t_last = [], time.monotonic()
        if over:
            run_dir.log(f"time budget reached at step {prog.step}")
            break
    bar.stop()
    seconds = prog.elapsed_before + (time.monotonic() - t0)
    run_dir.log(f"done step={prog.step} seconds={seconds:.0f} best={prog.best}")
    run_dir.close()
    return RunResult(prog.step, seconds, prog.best, str(out))
