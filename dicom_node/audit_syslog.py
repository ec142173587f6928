"""Audit records as RFC 5424 syslog messages: UDP (RFC 5426), TCP (RFC 6587) or TLS (RFC 5425).

Each record becomes one message ``<PRI>1 TIMESTAMP HOSTNAME dicom-node PID EVENT - MSG`` with
facility 10 (security/authorization, as IHE ATNA's examples use), severity notice (5) for
success and warning (4) for failures, the event kind as MSGID and the record's JSON as MSG
(UTF-8, after a byte order mark as RFC 5424 asks). Over TCP and TLS messages are framed by
octet counting. TLS uses the node's client profile (:mod:`dicom_node.net.tls`), verifying the
collector's certificate and host name.

Messages are sent from one background thread per trail, so a slow or absent collector never
holds up an association; what cannot be sent is dropped with a WARNING (the audit file,
written first, keeps every record).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import queue
import socket
import ssl
import threading
import time
from typing import Any

from dicom_node.config_security import SyslogSection
from dicom_node.net.tls import client_context

log = logging.getLogger(__name__)

FACILITY_SECURITY = 10
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
APP_NAME = "dicom-node"
BOM = "\ufeff"
QUEUE_SIZE = 10_000
SEND_TIMEOUT = 5.0
"""Seconds to connect to, or send to, the collector."""
EXIT_FLUSH_SECONDS = 2.0
"""At interpreter exit, wait this long at most for queued messages."""


def format_message(entry: dict[str, Any], hostname: str) -> bytes:
    """One audit record as an RFC 5424 message (without transport framing)."""
    severity = SEVERITY_NOTICE if entry.get("outcome", 0) == 0 else SEVERITY_WARNING
    pri = FACILITY_SECURITY * 8 + severity
    pid = entry.get("source", {}).get("pid", "-")
    msgid = str(entry.get("event", "-"))[:32] or "-"
    body = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
    header = f"<{pri}>1 {entry['time']} {hostname or '-'} {APP_NAME} {pid} {msgid} -"
    return f"{header} {BOM}{body}".encode()


class SyslogSender:
    """Sends audit records to one collector from a background thread."""

    def __init__(self, cfg: SyslogSection) -> None:
        """Prepare (the thread starts with the first message)."""
        self.cfg = cfg
        self.hostname = socket.gethostname()
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_SIZE)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._warned_full = False
        atexit.register(self.flush, EXIT_FLUSH_SECONDS)  # a worker or CLI exiting sends first

    def send(self, entry: dict[str, Any]) -> None:
        """Queue one record (dropped with a warning when the queue is full)."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            if not self._warned_full:
                log.warning("audit syslog queue full: records go to the audit file only")
                self._warned_full = True
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
                self._thread.start()

    def flush(self, timeout: float) -> None:
        """Wait until everything queued was handed to the network (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                self._deliver(format_message(entry, self.hostname))
            except Exception as exc:  # never let the sender die; the file has the record
                where = f"{self.cfg.host}:{self.cfg.effective_port}"
                log.warning("audit syslog to %s (%s) failed: %s", where, self.cfg.transport, exc)
                self._disconnect()
            finally:
                self._queue.task_done()

    def _deliver(self, message: bytes) -> None:
        if self.cfg.transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(message, (self.cfg.host, self.cfg.effective_port))
            return
        framed = f"{len(message)} ".encode() + message
        for attempt in range(2):  # a collector may have closed an idle connection
            try:
                self._connected().sendall(framed)
                return
            except OSError:
                self._disconnect()
                if attempt:
                    raise

    def _connected(self) -> socket.socket:
        if self._sock is None:
            address = (self.cfg.host, self.cfg.effective_port)
            sock = socket.create_connection(address, timeout=SEND_TIMEOUT)
            if self.cfg.transport == "tls":
                assert self.cfg.ca_certificates is not None  # the config requires it
                ctx = client_context(
                    self.cfg.ca_certificates, self.cfg.certificate, self.cfg.private_key
                )
                try:
                    sock = ctx.wrap_socket(sock, server_hostname=self.cfg.host)
                except (ssl.SSLError, OSError):
                    sock.close()
                    raise
            self._sock = sock
        return self._sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
