"""The ``dicom-node`` command: serve, worker, echo, send, fuse, config check, series, jobs.

Exit codes (see :mod:`dicom_node.errors`): 0 success, 1 other failure, 2 bad usage,
65 bad data, 69 network failure, 74 storage / I/O failure, 78 configuration error.
Nothing imports this module; it only wires the others together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pydicom
import pydicom.config
from rich.console import Console
from rich.table import Table

from dicom_node.config import (
    ConfigWatcher,
    Destination,
    NodeConfig,
    config_path,
    load_config,
    read_config_file,
)
from dicom_node.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    ConfigError,
    NodeError,
    UsageError,
)

log = logging.getLogger("dicom_node.cli")

_ADHOC_DEST = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def _console(stream: Any = None) -> Console:
    out = stream or sys.stdout
    width = None if out.isatty() else 240
    return Console(file=out, width=width, highlight=False)


def _load(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> tuple[NodeConfig, Path]:
    return load_config(args.config, overrides)


def _destination(cfg: NodeConfig, name: str) -> Destination:
    """A configured destination by name, or an ad hoc ``AET@host:port``."""
    if name in cfg.destinations:
        return cfg.destinations[name]
    m = _ADHOC_DEST.match(name)
    if m:
        return Destination(ae_title=m["aet"], host=m["host"], port=int(m["port"]))
    known = ", ".join(sorted(cfg.destinations)) or "none configured"
    raise UsageError(f"unknown destination {name!r} (known: {known}; or give AET@host:port)")


# -- serve ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the storage SCP until SIGTERM/SIGINT."""
    from dicom_node.db import make_engine, migrate, session_factory
    from dicom_node.logs import set_level, setup_logging
    from dicom_node.net.scp import StorageSCP
    from dicom_node.storage.store import Store

    overrides: dict[str, Any] = {
        "node.port": args.port,
        "node.ae_title": args.ae_title,
        "storage.root": str(args.storage.absolute()) if args.storage else None,
    }
    cfg, path = _load(args, overrides)
    setup_logging(cfg.logging, verbose=args.verbose)
    # Received headers are validated by the store; pydicom's per-value warnings are noise here.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    log.info("config: %s", path if path.exists() else "embedded defaults (no config file)")
    engine = make_engine(cfg.database_url)
    migrate(engine)
    store = Store(cfg.storage.root, session_factory(engine), cfg.storage.min_free_mb)
    scp = StorageSCP(cfg, store)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping after in-flight associations", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    scp.start()
    # -- orchestration (issue 5): scheduler + one embedded worker process ------------------
    from dicom_node.orchestration.scheduler import NodeScheduler
    from dicom_node.orchestration.worker import EmbeddedWorker

    # the worker re-reads the file only when no command-line override would be lost
    worker = EmbeddedWorker(cfg, None if any(v is not None for v in overrides.values()) else path)
    worker.start()
    scheduler = NodeScheduler(cfg, session_factory(engine), supervise=worker.supervise)
    scheduler.start()
    # -- end orchestration ----------------------------------------------------------------
    watcher = ConfigWatcher(path, cfg, overrides=overrides)

    def _apply(new: NodeConfig) -> None:
        scp.reload(new)
        store.min_free_mb = new.storage.min_free_mb
        set_level(new.logging)
        scheduler.reload(new)  # orchestration (issue 5)

    watcher.subscribe(_apply)
    watcher.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        watcher.stop()
        scheduler.stop()  # orchestration (issue 5)
        clean = scp.stop(graceful=True)
        store.close()
        worker.stop()  # orchestration (issue 5): the worker hands its job back to the queue
        engine.dispose()
    log.info("node stopped%s", "" if clean else " (some associations were aborted)")
    return EXIT_OK


# -- worker / fuse / jobs: implemented by other modules --------------------------------------
def _optional_module(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise NodeError(f"{what} is not available in this installation ({name} missing)") from None


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the fusion worker process (dicom_node.orchestration.worker.main)."""
    from dicom_node.logs import setup_logging

    worker = _optional_module("dicom_node.orchestration.worker", "the worker")
    cfg, path = _load(args)
    setup_logging(cfg.logging, verbose=args.verbose)
    return int(worker.main(cfg, path) or 0)


def cmd_fuse(args: argparse.Namespace) -> int:
    """Offline fusion of a CT and an MR folder into an output folder."""
    from dicom_node.logs import setup_logging

    pipeline = _optional_module("dicom_node.imaging.pipeline", "offline fusion")
    cfg, _ = _load(args)
    setup_logging(cfg.logging, verbose=args.verbose)
    for flag, folder in (("--ct", args.ct), ("--mr", args.mr)):
        if not folder.is_dir():
            raise UsageError(f"{flag} {folder}: not a folder")
    result = pipeline.run_offline(
        args.ct, args.mr, args.out, config=cfg, progress=not args.no_progress
    )
    console = _console()
    table = Table(title=f"fusion written to {args.out}")
    table.add_column("output")
    table.add_column("objects", justify="right")
    for kind, datasets in result.datasets.items():
        table.add_row(kind, str(len(datasets)))
    console.print(table)
    for stage, seconds in result.stage_seconds.items():
        console.print(f"{stage}: {seconds:.1f} s")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    """Job administration (dicom_node.cli.jobs)."""
    jobs_cli = _optional_module("dicom_node.cli.jobs", "job administration")
    cfg, _ = _load(args)
    if args.jobs_cmd == "list":
        return int(jobs_cli.list_jobs(cfg, state=args.state, limit=args.limit) or 0)
    func = {"show": "show_job", "retry": "retry_job", "cancel": "cancel_job"}[args.jobs_cmd]
    return int(getattr(jobs_cli, func)(cfg, args.job_id) or 0)


# -- echo / send -----------------------------------------------------------------------------
def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a destination."""
    from dicom_node.net.scu import echo

    cfg, _ = _load(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    dest = _destination(cfg, args.dest)
    calling = args.calling_aet or cfg.node.ae_title
    echo(dest, calling_aet=calling, timeout=args.timeout)
    print(f"C-ECHO {calling} -> {dest.ae_title}@{dest.host}:{dest.port}: success")
    return EXIT_OK


def expand_paths(paths: Sequence[Path]) -> list[Path]:
    """Files as given, and every regular file below given folders (sorted, hidden skipped)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts)
                )
            )
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files / folders to a destination (one association per series)."""
    from dicom_node.net.scu import send_files

    cfg, _ = _load(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    dest = _destination(cfg, args.dest)
    files = expand_paths(args.paths)
    if not files:
        raise UsageError("no files to send")
    result = send_files(
        dest, files, calling_aet=args.calling_aet or cfg.node.ae_title, retries=args.retries
    )
    print(
        f"sent {result.sent} instance(s) to {dest.ae_title}@{dest.host}:{dest.port} "
        f"in {result.seconds:.1f} s ({result.attempts} association attempt(s))"
    )
    return EXIT_OK


# -- config check ----------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a config file; print a summary or the error."""
    path = args.path or args.config
    resolved, explicit = config_path(path)
    if not explicit and not resolved.exists():
        print(f"no config file at {resolved}: the embedded defaults apply (OK)")
        return EXIT_OK
    cfg = read_config_file(resolved)
    node = cfg.node
    print(f"{resolved}: OK")
    print(
        f"  node: AE {node.ae_title!r} on {node.host}:{node.port}, "
        f"allowed callers: {', '.join(node.allowed_calling_aets) or 'ANY (warning)'}"
    )
    print(f"  storage: {cfg.storage.root} (min free {cfg.storage.min_free_mb} MB)")
    print(f"  database: {cfg.database.url}")
    for name, dest in cfg.destinations.items():
        routed = " (routed)" if name in cfg.routing.send_to else ""
        print(
            f"  destination {name}: {dest.ae_title}@{dest.host}:{dest.port} "
            f"sends {', '.join(dest.send)}{routed}"
        )
    return EXIT_OK


# -- series ----------------------------------------------------------------------------------
def cmd_series(args: argparse.Namespace) -> int:
    """Print the index as a table, newest series first."""
    from sqlalchemy import select

    from dicom_node.db import make_engine, migrate, schema_version, session_factory
    from dicom_node.models import Patient, Series, Study

    cfg, _ = _load(args)
    engine = make_engine(cfg.database_url)
    if schema_version(engine) == 0:
        migrate(engine)
    query = (
        select(Series, Study, Patient)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .order_by(Series.last_received_at.desc())
        .limit(args.limit)
    )
    if args.modality:
        query = query.where(Series.modality == args.modality.upper())
    with session_factory(engine)() as session:
        rows = session.execute(query).all()
    engine.dispose()
    table = Table(title=f"series in {cfg.database_url} ({len(rows)} shown)")
    if args.show_patient:
        table.add_column("Patient ID")
    for col in (
        "Series UID",
        "Mod",
        "Description",
        "Study date",
        "Inst",
        "Last received (UTC)",
        "From AE",
        "State",
    ):
        table.add_column(col, justify="right" if col == "Inst" else "left", overflow="fold")
    for series, study, patient in rows:
        cells = [
            series.series_instance_uid,
            series.modality or "",
            series.series_description or "",
            study.study_date or "",
            str(series.number_of_instances),
            series.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
            series.calling_aet,
            series.state,
        ]
        if args.show_patient:
            cells.insert(0, patient.patient_id)
        table.add_row(*cells)
    _console().print(table)
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``--config`` and ``-v`` accepted before or after the command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="config file (default: $DICOM_NODE_CONFIG, else config/node.yaml)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    parser = argparse.ArgumentParser(
        prog="dicom-node", parents=[common], description="MR-CT fusion DICOM node"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the DICOM storage SCP")
    p.add_argument("--port", type=int, help="override node.port")
    p.add_argument("--ae-title", help="override node.ae_title")
    p.add_argument("--storage", type=Path, help="override storage.root")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", parents=[common], help="run the fusion worker")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a destination")
    p.add_argument("dest", help="destination name from the config, or AET@host:port")
    p.add_argument("--calling-aet", help="calling AE title (default: node.ae_title)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", parents=[common], help="C-STORE files or folders to a destination")
    p.add_argument("dest", help="destination name from the config, or AET@host:port")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    p.add_argument("--calling-aet", help="calling AE title (default: node.ae_title)")
    p.add_argument("--retries", type=int, default=3, help="association retries (default 3)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("fuse", parents=[common], help="fuse a CT and an MR series offline")
    p.add_argument("--ct", type=Path, required=True, help="folder of the CT series")
    p.add_argument("--mr", type=Path, required=True, help="folder of the MR series")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("config", parents=[common], help="configuration tools")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    c = csub.add_parser("check", parents=[common], help="validate a config file")
    c.add_argument("path", nargs="?", type=Path, help="file (default: the one serve would use)")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("series", parents=[common], help="list received series")
    p.add_argument("--limit", type=int, default=100, help="rows (default 100)")
    p.add_argument("--modality", help="only this modality (CT, MR)")
    p.add_argument("--show-patient", action="store_true", help="include the Patient ID column")
    p.set_defaults(func=cmd_series)

    p = sub.add_parser("jobs", parents=[common], help="fusion jobs")
    jsub = p.add_subparsers(dest="jobs_cmd", required=True, metavar="ACTION")
    j = jsub.add_parser("list", parents=[common], help="list jobs")
    j.add_argument("--state", help="only jobs in this state")
    j.add_argument("--limit", type=int, default=50)
    for action, text in (
        ("show", "show one job"),
        ("retry", "queue a failed job again"),
        ("cancel", "cancel a job"),
    ):
        j = jsub.add_parser(action, parents=[common], help=text)
        j.add_argument("job_id", type=int)
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dicom-node``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)
    args.verbose = getattr(args, "verbose", False)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return exc.exit_code
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # unexpected: show it, exit 1
        logging.getLogger("dicom_node").exception("unexpected error")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
