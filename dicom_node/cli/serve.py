"""``dicom-node serve`` (listener + scheduler + embedded worker) and ``dicom-node worker``.

With ``worker.embedded: false`` serve runs no worker: it receives, pairs and retries sends, and
``dicom-node worker`` processes on this or other machines (same ``database.url`` and
``storage.root``) do the fusion.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pydicom.config

from dicom_node import audit
from dicom_node.cli.common import load
from dicom_node.config import NodeConfig
from dicom_node.config_watcher import ConfigChange, ConfigWatcher
from dicom_node.errors import EXIT_OK

if TYPE_CHECKING:
    from dicom_node.console.server import ConsoleServer

log = logging.getLogger(__name__)

MAIN_LOOP_TICK = 0.5
"""Seconds between two looks at the stop flag of ``serve``'s main thread."""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``serve`` and ``worker``."""
    p = sub.add_parser(
        "serve", parents=[common], help="run the DICOM node (SCP + scheduler + embedded worker)"
    )
    p.add_argument("--port", type=int, help="override node.port")
    p.add_argument("--ae-title", help="override node.ae_title")
    p.add_argument("--storage", type=Path, help="override storage.root")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("worker", parents=[common], help="run a fusion worker")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the fusion worker process."""
    from dicom_node.logs import setup_logging
    from dicom_node.orchestration.worker import main

    cfg, path = load(args)
    setup_logging(cfg.logging, verbose=args.verbose)
    return main(cfg, path)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the storage SCP, the scheduler and (``worker.embedded``) one worker until SIGTERM."""
    from dicom_node.logs import setup_logging

    overrides: dict[str, Any] = {
        "node.port": args.port,
        "node.ae_title": args.ae_title,
        "storage.root": str(args.storage.absolute()) if args.storage else None,
    }
    cfg, path = load(args, overrides)
    setup_logging(cfg.logging, verbose=args.verbose)
    # Received headers are validated by the store; pydicom's per-value warnings are noise here.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    log.info("config: %s", path if path.exists() else "embedded defaults (no config file)")
    # the worker re-reads the file only when no command-line override would be lost
    worker_config = None if any(v is not None for v in overrides.values()) else path
    node = _Node(cfg, worker_config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping after in-flight associations", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    audit.trail(cfg).application(True, ae_title=cfg.node.ae_title, what="serve")
    watcher = ConfigWatcher(path, cfg, overrides=overrides)
    watcher.subscribe(node.reload)
    watcher.on_change(lambda change: _audit_config_change(watcher.current, change))
    watcher.start()
    console = _start_console(cfg, path, watcher, node, overrides)
    try:
        while not stop.wait(MAIN_LOOP_TICK):
            pass
    finally:
        if console is not None:
            console.stop()
        watcher.stop()
        clean = node.stop()
        final = watcher.current
        audit.trail(final).application(False, ae_title=final.node.ae_title, what="serve")
        audit.flush_all()
    log.info("node stopped%s", "" if clean else " (some associations were aborted)")
    return EXIT_OK


def _audit_config_change(current: NodeConfig, change: ConfigChange) -> None:
    """The audit record of a reload, in the trail of the config now in force."""
    audit.trail(current).config_change(change, ae_title=current.node.ae_title)


def _start_console(
    cfg: NodeConfig, path: Path, watcher: ConfigWatcher, node: _Node, overrides: dict[str, Any]
) -> ConsoleServer | None:
    """The admin console (``http`` section), serving in this process; None without one."""
    if cfg.http is None:
        return None
    from dicom_node.console.server import start_console

    worker = node.worker
    return start_console(
        cfg,
        path,
        watcher=watcher,
        sessions=node.sessions,
        # without an embedded worker the workers run elsewhere: their state is unknown here
        worker_alive=(lambda: worker.alive) if worker is not None else (lambda: None),
        overrides=overrides,
    )


class _Node:
    """The parts ``serve`` runs: index, store, listener, scheduler, embedded worker."""

    def __init__(self, cfg: NodeConfig, worker_config: Path | None) -> None:
        from dicom_node.db import clock_skew_seconds, make_engine, migrate, session_factory
        from dicom_node.net.scp import StorageSCP
        from dicom_node.orchestration.embedded import EmbeddedWorker
        from dicom_node.orchestration.jobs import check_clock
        from dicom_node.orchestration.scheduler import NodeScheduler
        from dicom_node.storage.store import Store

        self.engine = make_engine(cfg.database_url)
        migrate(self.engine)
        check_clock(clock_skew_seconds(self.engine), cfg.jobs.lease_seconds)
        self.sessions = sessions = session_factory(self.engine)
        self.store = Store(cfg.storage.root, sessions, cfg.storage.min_free_mb)
        self.scp = StorageSCP(cfg, self.store)
        self.worker = EmbeddedWorker(cfg, worker_config) if cfg.worker.embedded else None
        supervise = self.worker.supervise if self.worker is not None else None
        self.scheduler = NodeScheduler(cfg, sessions, supervise=supervise, store=self.store)

    def start(self) -> None:
        """Listen, start the worker process (when embedded) and the periodic tasks."""
        self.scp.start()
        if self.worker is not None:
            self.worker.start()
        else:
            log.info("no embedded worker (worker.embedded: false): `dicom-node worker` runs jobs")
        self.scheduler.start()

    def reload(self, new: NodeConfig) -> None:
        """Apply a reloaded config to every part that can change without a restart."""
        from dicom_node.logs import set_level

        self.scp.reload(new)
        self.store.min_free_mb = new.storage.min_free_mb
        set_level(new.logging)
        self.scheduler.reload(new)

    def stop(self) -> bool:
        """Stop everything; False when some associations had to be aborted."""
        self.scheduler.stop()
        clean = self.scp.stop(graceful=True)
        self.store.close()
        if self.worker is not None:
            self.worker.stop()  # the worker hands its job back to the queue
        self.engine.dispose()
        return clean
