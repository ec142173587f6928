"""``dicom-node healthcheck``: is this process's part of the node able to work?

For container health checks (``HEALTHCHECK`` in docker/Dockerfile, compose) and monitoring:

* ``dicom-node healthcheck`` (role ``serve``): a DICOM C-ECHO to the node's own listener on
  loopback, with the AE title and port of its config and its own AE title as caller (a node
  with ``node.allowed_calling_aets`` must list its own AE title for this check); a node with
  only a TLS listener: a TCP connection to its TLS port;
* ``dicom-node healthcheck --role worker``: the index database answers and the storage root is
  the node's shared storage (a worker that lost either can do no job).

Exit status 0 and one line when healthy; otherwise the usual error exit codes (69 network,
74 storage, ...) with the reason.
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

from dicom_node.cli.common import load
from dicom_node.config import Destination, NodeConfig
from dicom_node.errors import EXIT_OK, NetworkError, StorageError

LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0
ROLES = ("serve", "worker")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``healthcheck``."""
    p = sub.add_parser(
        "healthcheck", parents=[common], help="check that serve (or a worker) can work"
    )
    p.add_argument("--role", choices=ROLES, default="serve", help="what to check (default serve)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (default 10)")
    p.set_defaults(func=cmd_healthcheck)


def check_serve(cfg: NodeConfig, timeout: float) -> str:
    """C-ECHO the node's own plain listener on loopback (a TLS-only node: its TLS port
    accepts connections; a C-ECHO there would need a client certificate)."""
    from dicom_node.net.scu import echo

    node = cfg.node
    if node.port is None:
        return _check_tls_port(cfg, timeout)
    echo(
        Destination(ae_title=node.ae_title, host=LOOPBACK, port=node.port),
        calling_aet=node.ae_title,
        timeout=timeout,
    )
    return f"serve: C-ECHO {node.ae_title}@{LOOPBACK}:{node.port} ok"


def _check_tls_port(cfg: NodeConfig, timeout: float) -> str:
    tls = cfg.node.tls
    if tls is None or tls.port is None:
        raise NetworkError("the node has neither a plain nor a TLS listener configured")
    try:
        with socket.create_connection((LOOPBACK, tls.port), timeout=timeout):
            pass
    except OSError as exc:
        raise NetworkError(
            f"TLS listener {LOOPBACK}:{tls.port} refuses connections: {exc}"
        ) from None
    return f"serve: TLS listener {LOOPBACK}:{tls.port} accepts connections"


def check_worker(cfg: NodeConfig) -> str:
    """The storage root is the node's and the database answers."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from dicom_node.db import make_engine, redacted_url
    from dicom_node.storage.source import check_storage_root

    check_storage_root(cfg.storage.root)
    engine = make_engine(cfg.database_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        url = redacted_url(cfg.database_url)
        raise StorageError(f"database {url} does not answer: {type(exc).__name__}") from None
    finally:
        engine.dispose()
    return f"worker: database and storage {cfg.storage.root} ok"


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Run the check of ``--role``; a failure raises a NodeError (its exit code)."""
    cfg, _ = load(args)
    if args.role == "worker":
        print(check_worker(cfg))
    else:
        print(check_serve(cfg, args.timeout))
    return EXIT_OK
