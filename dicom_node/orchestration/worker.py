"""The worker process: claims jobs and runs volumes -> register -> fuse -> derive -> dispatch.

It runs in its own process (``dicom-node worker``, or the one ``dicom-node serve`` embeds), so a
crash or an out-of-memory kill here never touches the SCP's associations. Any number of workers
may share one database: claims are atomic (see :mod:`dicom_node.orchestration.jobs`).

For each claimed job the worker

1. reuses the derived files of an earlier attempt when their manifest is complete (a retry
   never recomputes), else reads both series, runs :func:`dicom_node.imaging.pipeline.run_pair`
   (registering, fusing) and writes every derived instance plus ``manifest.json`` under
   ``storage.root/derived/<job id>/`` (writing);
2. sends to every destination once (sending); destinations that fail are left to the
   per-destination retries of :func:`dicom_node.orchestration.dispatch.retry_due_sends`.

While it works it refreshes the job's heartbeat; SIGTERM makes it hand the job back to the
queue (without counting the attempt) and exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import models
from dicom_node.config import ConfigWatcher, NodeConfig
from dicom_node.errors import EXIT_DATA, NodeError
from dicom_node.models import Instance, Job, Series
from dicom_node.orchestration import dispatch, jobs
from dicom_node.orchestration.dispatch import DerivedFile

log = logging.getLogger(__name__)

# run_pair's stage names -> job states (anything else is ignored)
_STAGE_MAP = {
    "register": jobs.REGISTERING,
    "registering": jobs.REGISTERING,
    "registration": jobs.REGISTERING,
    "resample": jobs.REGISTERING,
    "fuse": jobs.FUSING,
    "fusing": jobs.FUSING,
    "fusion": jobs.FUSING,
    "derive": jobs.WRITING,
    "writing": jobs.WRITING,
    "write": jobs.WRITING,
}


class WorkerStopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised in the worker's main thread by SIGTERM/SIGINT while a job runs."""


class LeaseLost(Exception):  # noqa: N818
    """The job was cancelled or taken away while this worker ran it."""


def new_worker_id() -> str:
    """A worker identity unique across hosts and restarts: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


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


def series_paths(sessions: sessionmaker[Session], root: Path, series_uid: str) -> list[Path]:
    """Stored files of a series, in slice order."""
    with sessions() as session:
        rows = session.execute(
            select(Instance.path, Instance.slice_position, Instance.instance_number)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
        ).all()
    ordered = sorted(rows, key=lambda r: (r[1] is None, r[1] or 0.0, r[2] or 0, r[0]))
    return [root / r[0] for r in ordered]


def _write_outputs(
    folder: Path, datasets: dict[str, list[Any]], info: dict[str, Any]
) -> list[DerivedFile]:
    """Write every derived dataset (fsynced) and then the manifest, atomically per file."""
    if folder.exists():
        shutil.rmtree(folder)  # leftovers of an interrupted attempt: never half-reuse them
    folder.mkdir(parents=True)
    files: list[DerivedFile] = []
    for kind, items in datasets.items():
        sub = folder / kind
        sub.mkdir()
        for ds in items:
            sop = str(ds.SOPInstanceUID)
            path = sub / f"{sop}.dcm"
            tmp = sub / f".{sop}.tmp"
            ds.save_as(tmp, enforce_file_format=True)
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            files.append(DerivedFile(kind, sop, str(ds.SeriesInstanceUID), path))
        dir_fd = os.open(sub, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    dispatch.write_manifest(folder, files, info)
    return files


def _quality_info(quality: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (
        "metric_value",
        "mask_dice",
        "iterations",
        "seconds",
        "angle_from_header_deg",
        "warnings",
    ):
        value = getattr(quality, key, None)
        if isinstance(value, int | float | str | list):
            out[key] = value
    return out


def compute(
    ctx: Context, job: Job, folder: Path, on_stage: Callable[[str], None]
) -> list[DerivedFile]:
    """Read both series, register, fuse, derive and write the outputs of ``job``."""
    from dicom_node.imaging import pipeline  # heavy (torch, SimpleITK): only in the worker

    config = ctx.config
    root = config.storage.root
    ct_paths = series_paths(ctx.sessions, root, job.ct_series_uid)
    mr_paths = series_paths(ctx.sessions, root, job.mr_series_uid)
    if not ct_paths or not mr_paths:
        raise FileNotFoundError("source series no longer in the index (retention?)")
    t0 = time.monotonic()
    ct, mr = pipeline.read_pair(ct_paths, mr_paths, config=config)
    read_seconds = time.monotonic() - t0
    result = pipeline.run_pair(ct, mr, config=config, on_stage=on_stage, revision=job.revision)
    on_stage(jobs.WRITING)
    stage_seconds = {"read": round(read_seconds, 3)}
    stage_seconds.update({k: round(float(v), 3) for k, v in result.stage_seconds.items()})
    info = {
        "job": job.id,
        "revision": job.revision,
        "ct_series_uid": job.ct_series_uid,
        "mr_series_uid": job.mr_series_uid,
        "stage_seconds": stage_seconds,
        "warnings": list(result.warnings),
        "quality": _quality_info(result.quality),
    }
    return _write_outputs(folder, result.datasets, info)


def run_job(ctx: Context, job_id: int) -> str:
    """Run one claimed job as far as it goes; returns the job's state afterwards."""
    config = ctx.config
    cfg = jobs.settings(config)
    wid = ctx.worker_id
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return "missing"
        session.expunge(job)
    folder = dispatch.job_dir(config, job_id)
    jobs.set_output_dir(ctx.sessions, job_id, str(folder))
    log.info(
        "job %d: attempt %d, CT %s + MR %s (revision %d)",
        job_id,
        job.attempts,
        job.ct_series_uid,
        job.mr_series_uid,
        job.revision,
    )

    def enter(stage: str) -> None:
        if not jobs.enter_stage(ctx.sessions, job_id, wid, stage):
            raise LeaseLost(f"job {job_id} is no longer ours (cancelled or requeued)")

    last_stage = [""]

    def on_stage(name: str) -> None:
        stage = _STAGE_MAP.get(name.lower(), "")
        if stage and stage != last_stage[0]:
            last_stage[0] = stage
            enter(stage)

    try:
        with dispatch.heartbeat_thread(
            lambda: jobs.heartbeat(ctx.sessions, job_id, wid), cfg.heartbeat_seconds
        ) as lost:
            files = dispatch.read_manifest(folder)
            if files is None:
                on_stage(jobs.REGISTERING)
                files = compute(ctx, job, folder, on_stage)
            else:
                log.info(
                    "job %d: reusing %d derived files of an earlier attempt", job_id, len(files)
                )
            if lost.is_set():
                raise LeaseLost(f"job {job_id} lease lost")
            enter(jobs.SENDING)
            outcome = dispatch.send_job(ctx.sessions, ctx.config, job_id, wid, files)
            log.info(
                "job %d: first send round: %s",
                job_id,
                ", ".join(f"{k}={v}" for k, v in outcome.items()) or "no destinations",
            )
        jobs.release_to_sends(ctx.sessions, job_id, wid)
        return jobs.finish_if_sent(ctx.sessions, job_id) or jobs.SENDING
    except WorkerStopping:
        _hand_back(ctx.sessions, job_id, wid)
        raise
    except LeaseLost as exc:
        log.warning("%s", exc)
        return "lost"
    except Exception as exc:
        # Data errors (unreadable series, unreliable registration, ...) fail the same way on
        # every attempt: no retries for them (``dicom-node jobs retry`` still can).
        permanent = isinstance(exc, NodeError) and exc.exit_code == EXIT_DATA
        detail = f"{type(exc).__name__}: {exc}" + (
            " (data error: not retried)" if permanent else ""
        )
        log.error("job %d failed: %s", job_id, detail)
        log.debug("job %d traceback:\n%s", job_id, traceback.format_exc())
        return (
            jobs.fail_attempt(ctx.sessions, job_id, wid, detail, cfg, permanent=permanent) or "lost"
        )


def _hand_back(sessions: sessionmaker[Session], job_id: int, worker_id: str) -> None:
    """Requeue a job this worker is abandoning on shutdown, without counting the attempt."""
    now = models.utcnow()
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state.in_(jobs.ACTIVE_STATES))
            .values(
                state=jobs.QUEUED,
                worker_id=None,
                heartbeat_at=None,
                updated_at=now,
                attempts=Job.attempts - 1,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
    log.info("job %d handed back to the queue (worker stopping)", job_id)


def _configure_compute(config: NodeConfig) -> None:
    threads = config.worker.threads
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            import torch

            torch.set_num_threads(int(threads))
        except ImportError:  # torch is a dependency; tolerate a broken install here
            pass
        try:
            import SimpleITK

            SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
        except ImportError:
            pass


def _compute_summary(config: NodeConfig) -> str:
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
    from dicom_node.db import make_engine, migrate, session_factory

    _configure_compute(config)
    engine = make_engine(config.database_url)
    migrate(engine)
    sessions = session_factory(engine)
    watcher: ConfigWatcher | None = None
    if config_file is not None and Path(config_file).exists():
        watcher = ConfigWatcher(Path(config_file), config)
        watcher.start()
    source: Callable[[], NodeConfig] = (lambda: watcher.current) if watcher else (lambda: config)
    ctx = Context(source, sessions, new_worker_id())
    stop_event = stop or threading.Event()
    busy = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("worker %s: %s received, stopping", ctx.worker_id, signal.Signals(signum).name)
        stop_event.set()
        if busy.is_set():
            raise WorkerStopping()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info(
        "worker %s started (%s, threads %s)",
        ctx.worker_id,
        _compute_summary(config),
        config.worker.threads or "default",
    )
    done = 0
    last_recovery = 0.0
    try:
        while not stop_event.is_set():
            cfg = jobs.settings(ctx.config)
            now = time.monotonic()
            if now - last_recovery >= max(0.5, cfg.lease_seconds / 2):
                last_recovery = now
                jobs.recover_stale(sessions, cfg, local_host=socket.gethostname())
            job_id = jobs.claim_next(sessions, ctx.worker_id)
            if job_id is not None:
                busy.set()
                try:
                    state = run_job(ctx, job_id)
                finally:
                    busy.clear()
                log.info("job %d: %s", job_id, state)
                done += 1
                if max_jobs is not None and done >= max_jobs:
                    break
                continue
            if dispatch.retry_due_sends(sessions, ctx.config, ctx.worker_id):
                continue
            stop_event.wait(cfg.poll_seconds)
    except WorkerStopping:
        pass
    finally:
        if watcher is not None:
            watcher.stop()
        engine.dispose()
    log.info("worker %s stopped", ctx.worker_id)
    return 0


# --------------------------------------------------------------------------- embedded worker
def _embedded_entry(config: NodeConfig, config_file: Path | None) -> None:
    from dicom_node.logs import setup_logging

    setup_logging(config.logging)
    raise SystemExit(main(config, config_file))


class EmbeddedWorker:
    """The worker process ``dicom-node serve`` starts and restarts when it dies."""

    def __init__(self, config: NodeConfig, config_file: Path | None = None) -> None:
        """Prepare (not start) a worker process for ``config``."""
        self.config = config
        self.config_file = config_file
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """Process id of the running worker, if any."""
        return None if self._proc is None else int(self._proc.pid)

    def start(self) -> None:
        """Start the worker process."""
        self._stopping = False
        self._proc = self._ctx.Process(
            target=_embedded_entry,
            args=(self.config, self.config_file),
            name="dicom-node-worker",
            daemon=False,
        )
        self._proc.start()
        log.info("embedded worker started (pid %s)", self._proc.pid)

    def supervise(self) -> None:
        """Restart the worker when it died (crash, OOM kill); call periodically."""
        if self._stopping or self._proc is None or self._proc.is_alive():
            return
        code = self._proc.exitcode
        self.restarts += 1
        log.error(
            "embedded worker (pid %s) died with exit code %s: restarting (restart %d)",
            self._proc.pid,
            code,
            self.restarts,
        )
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the worker (it hands its job back) and wait; SIGKILL after ``timeout``."""
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        log.info("embedded worker stopped (exit code %s)", proc.exitcode)
