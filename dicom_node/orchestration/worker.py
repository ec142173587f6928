"""The worker process: claims jobs and runs volumes -> register -> fuse -> derive -> dispatch.

It runs in its own process (``dicom-node worker``, or the one ``dicom-node serve`` embeds, see
:mod:`.embedded`), so a crash or an out-of-memory kill here never touches the SCP's
associations. Any number of workers may share one database: claims are atomic (see
:mod:`dicom_node.orchestration.jobs`).

For each claimed job the worker

1. reuses the derived files of an earlier attempt when their manifest is complete (a retry
   never recomputes), else reads both series (through :mod:`dicom_node.storage.source`, the
   shared storage root), runs :func:`dicom_node.imaging.pipeline.run_pair`
   (registering, fusing) and writes every derived instance plus the manifest
   (:mod:`dicom_node.storage.derived`, writing);
2. sends to every destination once (sending); destinations that fail are left to the
   per-destination retries of :func:`dicom_node.orchestration.dispatch.retry_due_sends`.

While it works it refreshes the job's heartbeat; SIGTERM makes it hand the job back to the
queue (without counting the attempt) and exit. A failed attempt is retried only when its error
is retryable (:attr:`dicom_node.errors.NodeError.retryable`); data errors fail at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig, read_config_file
from dicom_node.config_watcher import ConfigWatcher
from dicom_node.errors import ConfigError, NodeError, SourceSeriesMissingError
from dicom_node.models import Job
from dicom_node.orchestration import dispatch, jobs
from dicom_node.states import STAGE_JOB_STATE, JobState, Stage
from dicom_node.storage.derived import (
    PREVIEW,
    DerivedFile,
    job_dir,
    read_manifest,
    write_job_outputs,
)
from dicom_node.storage.source import check_storage_root, series_source

if TYPE_CHECKING:
    from dicom_node.imaging.pipeline import PipelineResult

log = logging.getLogger(__name__)

RECOVERY_MIN_INTERVAL = 0.5
"""Shortest interval between two stale-lease recoveries run by an idle worker (seconds)."""


class WorkerStopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised in the worker's main thread by SIGTERM/SIGINT while a job runs."""


class LeaseLost(Exception):  # noqa: N818
    """The job was cancelled or taken away while this worker ran it."""


def new_worker_id() -> str:
    """A worker identity unique across hosts and restarts: host:pid:random."""
    return jobs.owner_id(uuid.uuid4().hex[:6])


@dataclass
class Context:
    """What a worker needs: the current config (reloadable), sessions and its identity."""

    config_source: Callable[[], NodeConfig]
    sessions: sessionmaker[Session]
    worker_id: str

    @property
    def config(self) -> NodeConfig:
        """The config now in force."""
        return self.config_source()


class _StageTracker:
    """Moves the job's state along as the pipeline announces its stages."""

    def __init__(self, ctx: Context, job_id: int) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.state: JobState | None = None

    def enter(self, state: JobState) -> None:
        """Record ``state``; raise :class:`LeaseLost` when the job is no longer ours."""
        if state == self.state:
            return
        if not jobs.enter_stage(self.ctx.sessions, self.job_id, self.ctx.worker_id, state):
            raise LeaseLost(f"job {self.job_id} is no longer ours (cancelled or requeued)")
        self.state = state

    def on_stage(self, stage: Stage) -> None:
        """The pipeline's stage callback: stages without a job state change nothing."""
        state = STAGE_JOB_STATE.get(stage)
        if state is not None:
            self.enter(state)


def compute(ctx: Context, job: Job, folder: Path, tracker: _StageTracker) -> list[DerivedFile]:
    """Read both series, register, fuse, derive and write the outputs of ``job``."""
    from dicom_node.imaging import pipeline  # heavy (torch, SimpleITK): only in the worker

    config = ctx.config
    source = series_source(config, ctx.sessions)
    t0 = time.monotonic()
    with (
        source.open_series(job.ct_series_uid) as ct_paths,
        source.open_series(job.mr_series_uid) as mr_paths,
    ):
        if not ct_paths or not mr_paths:
            raise SourceSeriesMissingError("source series no longer in the index (retention?)")
        ct, mr = pipeline.read_pair(ct_paths, mr_paths, config=config)
    read_seconds = time.monotonic() - t0
    result = pipeline.run_pair(
        ct, mr, config=config, on_stage=tracker.on_stage, revision=job.revision
    )
    tracker.enter(JobState.WRITING)
    stage_seconds = {str(Stage.READ): round(read_seconds, 3)}
    stage_seconds.update({str(k): round(v, 3) for k, v in result.stage_seconds.items()})
    info = {
        "job": job.id,
        "revision": job.revision,
        "ct_series_uid": job.ct_series_uid,
        "mr_series_uid": job.mr_series_uid,
        "stage_seconds": stage_seconds,
        "warnings": list(result.warnings),
        "quality": result.quality_info(),
    }
    files = write_job_outputs(folder, result.datasets, info)
    _write_preview(folder, job.id, result, config)
    return files


def _write_preview(folder: Path, job_id: int, result: PipelineResult, config: NodeConfig) -> None:
    """The job's preview PNG for the admin console; a failure costs the picture, not the job.

    Rendered under a temporary name and renamed, so the console never shows half a picture.
    """
    from dicom_node.imaging.offline import write_result_preview
    from dicom_node.imaging.pipeline import PipelineSettings

    t0 = time.monotonic()
    tmp = folder / f".{PREVIEW}.tmp.png"
    try:
        write_result_preview(tmp, result, PipelineSettings.from_config(config))
        os.replace(tmp, folder / PREVIEW)
    except Exception:
        log.exception("job %d: preview picture not written", job_id)
        tmp.unlink(missing_ok=True)
        return
    log.info("job %d: preview written in %.1f s", job_id, time.monotonic() - t0)


def _load_job(ctx: Context, job_id: int) -> Job | None:
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        if job is not None:
            session.expunge(job)
        return job


def run_job(ctx: Context, job_id: int) -> JobState | None:
    """Run one claimed job as far as it goes.

    Returns the job's state afterwards, or None when the job was not (or no longer) this
    worker's: deleted, cancelled or requeued by someone else meanwhile.
    """
    job = _load_job(ctx, job_id)
    if job is None:
        return None
    folder = job_dir(ctx.config, job_id)
    jobs.set_output_dir(ctx.sessions, job_id, str(folder))
    log.info(
        "job %d: attempt %d, CT %s + MR %s (revision %d)",
        job_id,
        job.attempts,
        job.ct_series_uid,
        job.mr_series_uid,
        job.revision,
    )
    try:
        return _run_claimed(ctx, job, folder)
    except WorkerStopping:
        jobs.hand_back(ctx.sessions, job_id, ctx.worker_id)
        raise
    except LeaseLost as exc:
        log.warning("%s", exc)
        return None
    except Exception as exc:
        return _fail(ctx, job_id, exc)


def _run_claimed(ctx: Context, job: Job, folder: Path) -> JobState | None:
    """Compute (or reuse) the derived files and make the first send round."""
    wid = ctx.worker_id
    tracker = _StageTracker(ctx, job.id)
    cfg = jobs.Settings.from_config(ctx.config)

    def beat() -> bool:
        return jobs.heartbeat(ctx.sessions, job.id, wid)

    with dispatch.heartbeat_thread(beat, cfg.heartbeat_seconds) as lost:
        files = read_manifest(folder)
        if files is None:
            tracker.enter(JobState.REGISTERING)
            files = compute(ctx, job, folder, tracker)
        else:
            log.info("job %d: reusing %d derived files of an earlier attempt", job.id, len(files))
        if lost.is_set():
            raise LeaseLost(f"job {job.id} lease lost")
        tracker.enter(JobState.SENDING)
        outcome = dispatch.send_job(ctx.sessions, ctx.config, job.id, wid, files)
        log.info(
            "job %d: first send round: %s",
            job.id,
            ", ".join(f"{k}={v}" for k, v in outcome.items()) or "no destinations",
        )
    jobs.release_to_sends(ctx.sessions, job.id, wid)
    return jobs.finish_if_sent(ctx.sessions, job.id) or JobState.SENDING


def _fail(ctx: Context, job_id: int, exc: Exception) -> JobState | None:
    """Record a failed attempt; errors that would fail the same way again are not retried."""
    retryable = exc.retryable if isinstance(exc, NodeError) else True
    detail = f"{type(exc).__name__}: {exc}"
    if not retryable:
        detail += " (not retried: the same input fails the same way; `dicom-node jobs retry`)"
    log.error("job %d failed: %s", job_id, detail)
    log.debug("job %d traceback:\n%s", job_id, traceback.format_exc())
    cfg = jobs.Settings.from_config(ctx.config)
    return jobs.fail_attempt(ctx.sessions, job_id, ctx.worker_id, detail, cfg, retryable=retryable)


def configure_compute(config: NodeConfig) -> None:
    """Limit torch's and SimpleITK's threads to ``worker.threads`` (when set)."""
    threads = config.worker.threads
    if not threads:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import SimpleITK
    import torch

    torch.set_num_threads(threads)
    SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def compute_summary(config: NodeConfig) -> str:
    """ "device D, precision P" as fusion will run (bf16 without native support says fp32)."""
    from fusion_engine.errors import FusionEngineError
    from fusion_engine.inference import resolve_device, resolve_precision

    try:
        device = resolve_device(config.worker.device)
        precision = resolve_precision(config.fusion.precision, device)
    except FusionEngineError as exc:
        log.error("fusion compute settings cannot be used: %s; jobs will fail until fixed", exc)
        return f"device {config.worker.device} (unusable), precision {config.fusion.precision}"
    return f"device {device}, precision {precision}"


class _Loop:
    """The worker's main loop: recover stale leases, claim, run, retry sends, idle."""

    def __init__(self, ctx: Context, stop: threading.Event) -> None:
        self.ctx = ctx
        self.stop = stop
        self.busy = threading.Event()
        self.last_recovery = 0.0

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop after handing back the job in progress."""
        log.info(
            "worker %s: %s received, stopping", self.ctx.worker_id, signal.Signals(signum).name
        )
        self.stop.set()
        if self.busy.is_set():
            raise WorkerStopping()

    def tick(self) -> bool:
        """One round; True when a job was run."""
        ctx = self.ctx
        cfg = jobs.Settings.from_config(ctx.config)
        now = time.monotonic()
        if now - self.last_recovery >= max(RECOVERY_MIN_INTERVAL, cfg.lease_seconds / 2):
            self.last_recovery = now
            jobs.recover_stale(ctx.sessions, cfg, local_host=jobs.host_identity())
        job_id = jobs.claim_next(ctx.sessions, ctx.worker_id)
        if job_id is not None:
            self.busy.set()
            try:
                state = run_job(ctx, job_id)
            finally:
                self.busy.clear()
            log.info("job %d: %s", job_id, state or "no longer ours")
            return True
        if not dispatch.retry_due_sends(ctx.sessions, ctx.config, ctx.worker_id):
            self.stop.wait(cfg.poll_seconds)
        return False


def _file_config(path: Path, fallback: NodeConfig) -> NodeConfig:
    """The config file as it reads now; ``fallback`` (logged) when it is invalid."""
    try:
        return read_config_file(path)
    except ConfigError as exc:
        log.error("config file invalid at worker start, using the last good config:\n%s", exc)
        return fallback


def main(
    config: NodeConfig,
    config_file: Path | None = None,
    *,
    stop: threading.Event | None = None,
    max_jobs: int | None = None,
) -> int:
    """Run a worker until SIGTERM/SIGINT (or ``stop`` is set); returns the exit code.

    ``config_file``: when it exists it is watched, so routing and destination edits apply to
    later sends without a restart.
    """
    from dicom_node.db import clock_skew_seconds, make_engine, migrate, session_factory

    check_storage_root(config.storage.root)
    configure_compute(config)
    engine = make_engine(config.database_url)
    migrate(engine)
    jobs.check_clock(clock_skew_seconds(engine), config.jobs.lease_seconds)
    watcher: ConfigWatcher | None = None
    if config_file is not None and Path(config_file).exists():
        # The file may have changed since this process was spawned (the console saves within
        # seconds of a start): the watcher's baseline must be the file as it reads now.
        config = _file_config(Path(config_file), config)
        watcher = ConfigWatcher(Path(config_file), config)
        watcher.start()
    source: Callable[[], NodeConfig] = (lambda: watcher.current) if watcher else (lambda: config)
    loop = _Loop(
        Context(source, session_factory(engine), new_worker_id()), stop or threading.Event()
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, loop.on_signal)
        signal.signal(signal.SIGINT, loop.on_signal)
    log.info(
        "worker %s started (%s, threads %s)",
        loop.ctx.worker_id,
        compute_summary(config),
        config.worker.threads or "default",
    )
    done = 0
    try:
        while not loop.stop.is_set() and (max_jobs is None or done < max_jobs):
            done += loop.tick()
    except WorkerStopping:
        pass
    finally:
        if watcher is not None:
            watcher.stop()
        engine.dispose()
    log.info("worker %s stopped", loop.ctx.worker_id)
    return 0
