"""Reading an audit log: records in order, and the hash chain that shows an edited line."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.audit_log import line_digest, read_log, verify_log


def _write_chain(path: Path, n: int) -> list[bytes]:
    lines: list[bytes] = []
    for i in range(n):
        prev = line_digest(lines[-1]) if lines else None
        lines.append(json.dumps({"n": i, "prev": prev}).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def test_intact_chain_reads_back_in_order(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write_chain(log, 4)
    assert [r["n"] for r in read_log(log)] == [0, 1, 2, 3]
    result = verify_log(log)
    assert (result.records, result.problems) == (4, [])


def test_edited_line_breaks_the_chain_after_it(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = _write_chain(log, 4)
    lines[1] = lines[1].replace(b'"n": 1', b'"n": 7')
    log.write_bytes(b"\n".join(lines) + b"\n")
    assert verify_log(log).problems == ["line 3: chain broken (a line before it changed)"]
    log.write_bytes(b"\n".join([*lines[:2], b"{cut", *lines[2:]]) + b"\n")
    assert verify_log(log).problems == [
        "line 3: not JSON (cut short or edited)",
        "line 4: chain broken (a line before it changed)",
    ]
