"""Audit records as RFC 5424 syslog over UDP, TCP and TLS, received by local collectors."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from pathlib import Path

import pytest

from dicom_node import audit
from dicom_node.audit_syslog import BOM, format_message
from dicom_node.config_security import SyslogSection
from dicom_node.states import JobAction
from tests.peers import free_port
from tests.peers.certs import make_world

HEADER_FIELDS = 7  # PRI+VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID, STRUCTURED-DATA


def parse(message: bytes) -> tuple[list[str], dict[str, object]]:
    """The header fields and the JSON body of an RFC 5424 message."""
    text = message.decode()
    header, _, body = text.partition(" " + BOM)
    fields = header.split(" ")
    assert len(fields) == HEADER_FIELDS, header
    return fields, json.loads(body)


def trail_to(tmp_path: Path, **syslog: object) -> audit.AuditTrail:
    cfg = SyslogSection.model_validate({"host": "127.0.0.1", **syslog})
    return audit.AuditTrail(
        tmp_path / "audit.jsonl", tmp_path / "k.key", source_id="NODE", syslog=cfg
    )


def test_message_format() -> None:
    entry = {
        "time": "2026-12-03T10:00:00.000001+00:00",
        "event": "association-start",
        "outcome": 0,
        "source": {"pid": 42},
    }
    fields, body = parse(format_message(entry, "node1"))
    assert fields == [
        "<85>1",
        "2026-12-03T10:00:00.000001+00:00",
        "node1",
        "dicom-node",
        "42",
        "association-start",
        "-",
    ]
    assert body == entry
    failed, _ = parse(format_message({**entry, "outcome": 4}, "node1"))
    assert failed[0] == "<84>1"


def test_udp(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(10)
        port = collector.getsockname()[1]
        trail = trail_to(tmp_path, transport="udp", port=port)
        trail.job_action(JobAction.RETRY, 3, result="queued again", user="admin")
        trail.flush()
        fields, body = parse(collector.recv(65_536))
    assert fields[5] == "job-action"
    assert body == audit.read_log(tmp_path / "audit.jsonl")[0]


def _collect_framed(server: socket.socket, out: list[bytes], n: int) -> None:
    conn, _ = server.accept()
    with conn:
        data = b""
        while len(out) < n:
            chunk = conn.recv(65_536)
            if not chunk:
                break
            data += chunk
            while b" " in data:
                length, _, rest = data.partition(b" ")
                if len(rest) < int(length):
                    break
                out.append(rest[: int(length)])
                data = rest[int(length) :]


def _framed_collector(server: socket.socket, n: int) -> tuple[threading.Thread, list[bytes]]:
    out: list[bytes] = []
    thread = threading.Thread(target=_collect_framed, args=(server, out, n), daemon=True)
    thread.start()
    return thread, out


def test_tcp_octet_counting(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        thread, got = _framed_collector(server, 2)
        trail = trail_to(tmp_path, transport="tcp", port=server.getsockname()[1])
        trail.job_action(JobAction.RETRY, 1, result="queued again", user="admin")
        trail.job_action(JobAction.CANCEL, 2, result="cancelled", user="admin")
        trail.flush()
        thread.join(10)
    assert [parse(m)[1]["outcome_text"] for m in got] == [
        "retry: queued again",
        "cancel: cancelled",
    ]


def test_tls_verifies_the_collector(tmp_path: Path) -> None:
    world = make_world(tmp_path / "certs")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(world.peer.certificate, world.peer.private_key)
    with socket.create_server(("127.0.0.1", 0)) as raw:
        raw.settimeout(10)
        port = raw.getsockname()[1]
        with ctx.wrap_socket(raw, server_side=True) as server:
            thread, got = _framed_collector(server, 1)
            trail = trail_to(
                tmp_path,
                transport="tls",
                port=port,
                ca_certificates=str(world.ca.certificate),
            )
            trail.job_action(JobAction.RETRY, 9, result="queued again", user="admin")
            trail.flush()
            thread.join(10)
    assert parse(got[0])[1]["detail"] == {"action": "retry"}


def test_absent_collector_loses_nothing_in_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trail = trail_to(tmp_path, transport="tcp", port=free_port())
    with caplog.at_level(logging.WARNING, logger="dicom_node.audit_syslog"):
        trail.job_action(JobAction.RETRY, 5, result="queued again", user="admin")
        trail.flush()
    assert "audit syslog to 127.0.0.1" in caplog.text
    assert len(audit.read_log(tmp_path / "audit.jsonl")) == 1
