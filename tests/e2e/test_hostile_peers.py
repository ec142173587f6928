"""The fuzz and load suite: a hostile-but-fair peer against a real ``dicom-node serve``.

Malformed datasets (truncated, oversized, garbage, wrong class or syntax, broken UIDs and
fragments) and malformed PDUs go over loopback from a raw socket peer; real senders are
DCMTK's storescu/echoscu. After each group the node must still answer, and its index must be
consistent with its files (every row's file exists with its size and hash and is readable; no
file without a row; nothing left in staging). Then 32 concurrent associations x 20 instances,
a SIGKILL during transfers, and a deleted index.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from dicom_node.cli import main as cli
from dicom_node.db import make_engine, session_factory
from dicom_node.logs import TRACEBACK_INDENT
from dicom_node.models import Instance
from tests.peers import dcmtk, wait_until
from tests.peers.consistency import assert_consistent
from tests.peers.node import NODE_AET, NodeProcess, node_config, start_node
from tests.peers.raw_dicom import (
    A_ABORT,
    A_RELEASE_RQ,
    EXPLICIT_LE,
    P_DATA_TF,
    VERIFICATION,
    RawAssociation,
    associate_rq,
    c_store_rq,
    command_set,
    parse_command,
    pdu,
)
from tests.support.data import SMALL_CT, rewrite_dataset
from tests.support.malformed import CT, Case, all_cases

pytestmark = [pytest.mark.peers, pytest.mark.slow]

LIMIT_MB = 2
CALLING = "FUZZER"


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the malformed inputs (max_instance_mb small, to test the limit)."""
    workdir = tmp_path_factory.mktemp("hostile")
    cfg = node_config(
        workdir,
        node={"association_request_timeout_seconds": 2, "network_timeout_seconds": 5},
        storage={"max_instance_mb": LIMIT_MB},
    )
    node = start_node(workdir, cfg)
    yield node
    assert node.stop() == 0, node.log_tail()


def cases() -> list[Case]:
    path = SMALL_CT / "CT_0001.dcm"
    if not path.exists():
        pytest.skip("small fixtures missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return all_cases(path, limit_mb=LIMIT_MB)


def indexed_uids(node: NodeProcess) -> set[str]:
    engine = make_engine(node.db_url)
    try:
        with session_factory(engine)() as s:
            return set(s.scalars(select(Instance.sop_instance_uid)))
    finally:
        engine.dispose()


def send_cases(node: NodeProcess, todo: list[Case]) -> dict[str, tuple[int | None, str]]:
    """Each case's C-STORE, on associations with one context per (class, syntax) needed; an
    association the node ends (no response) is replaced by a new one."""
    contexts: dict[tuple[str, str], int] = {}
    for case in todo:
        contexts.setdefault((case.context_class, case.transfer_syntax), 2 * len(contexts) + 1)
    proposed = [(cid, cls, [ts]) for (cls, ts), cid in contexts.items()]
    results: dict[str, tuple[int | None, str]] = {}
    a: RawAssociation | None = None
    try:
        for case in todo:
            if a is None:
                a = RawAssociation(node.port)
                assert len(a.associate(proposed, calling=CALLING).accepted) == len(contexts)
            cid = contexts[(case.context_class, case.transfer_syntax)]
            rsp = a.c_store(cid, case.request_class or case.context_class, case.sop_instance,
                            case.dataset)  # fmt: skip
            results[case.name] = (None, "no response") if rsp is None else (rsp.status, rsp.comment)
            if rsp is None:
                a.close()
                a = None
        if a is not None:
            a.release()
    finally:
        if a is not None:
            a.close()
    return results


def test_malformed_datasets_refused_good_ones_kept(hostile_node: NodeProcess) -> None:
    """Issue #9 items 1, 3, 4, 10, 12: every input gets the status it deserves, with a reason;
    the node keeps answering; the index matches the files."""
    todo = cases()
    results = send_cases(hostile_node, todo)
    table: Counter[str] = Counter()
    wrong = []
    for case in todo:
        status, comment = results.get(case.name, (None, "not sent"))
        table["tried"] += 1
        if status is None:
            table["crashed"] += 1
        elif case.accepted:
            table["accepted on purpose"] += status == 0
        elif status != 0 and comment:
            table["refused with a clear error"] += 1
        if status != case.expect:
            wrong.append(f"{case.name}: 0x{status or 0:04X} {comment} (want 0x{case.expect:04X})")
    assert not wrong, "\n".join(wrong)
    stored = indexed_uids(hostile_node)
    for case in todo:
        assert (case.sop_instance.decode("latin-1") in stored) == case.accepted, case.name
    table["lost"] = sum(1 for c in todo if c.accepted and c.sop_instance.decode() not in stored)
    print("\nmalformed datasets:", dict(table))
    groups = Counter(c.group for c in todo)  # the rows of the table in docs/node.md
    assert groups == {
        "truncated": 12,
        "trailing bytes": 7,
        "garbage": 7,
        "pixel data": 19,
        "SOP class": 5,
        "transfer syntax": 6,
        "UIDs": 10,
        "structure": 5,
        "fragments": 7,
        "size": 1,
        "accepted": 11,
    }
    assert dict(table) == {
        "tried": 90,
        "refused with a clear error": 79,
        "accepted on purpose": 11,
        "lost": 0,
    }
    assert hostile_node.echoscu(CALLING).returncode == 0
    report = assert_consistent(hostile_node)
    assert report.checked == 11
    for row_path in hostile_node.storage.rglob("*.dcm"):  # DCMTK reads every stored file
        dump = subprocess.run([dcmtk("dcmdump"), "-q", str(row_path)], capture_output=True)
        assert dump.returncode == 0, (row_path, dump.stderr)
    log = hostile_node.log()
    assert_no_forged_lines(log)
    assert "\\n2024-01-01 INFO forged line" in log  # the wire text, escaped within its record


ASSOCIATE = b""
"""In a PDU case: associate properly (and read the A-ASSOCIATE-AC) before what follows."""


def raw_pdu_cases() -> dict[str, list[bytes]]:
    """Malformed PDUs and protocol violations (each sent on a fresh connection)."""
    echo_ctx = [(1, VERIFICATION, [EXPLICIT_LE])]
    good_rq = associate_rq(NODE_AET, CALLING, [(1, CT, [EXPLICIT_LE])])
    store = c_store_rq(1, CT.encode(), b"1.2.3.4")
    no_dataset = command_set(
        [
            (0x0002, CT.encode()),
            (0x0100, b"\x01\x00"),
            (0x0110, b"\x01\x00"),
            (0x0700, b"\x00\x00"),
            (0x0800, b"\x01\x01"),
            (0x1000, b"1.2.3"),
        ]
    )
    c_find = command_set(
        [(0x0002, CT.encode()), (0x0100, b"\x20\x00"), (0x0110, b"\x01\x00"), (0x0800, b"\x01\x01")]
    )
    newline_syntax = [(1, "1.2.840.10008.1.1\nforged", [EXPLICIT_LE])]

    def pdv(cid: int, flags: int, data: bytes) -> bytes:
        return pdu(P_DATA_TF, (len(data) + 2).to_bytes(4, "big") + bytes([cid, flags]) + data)

    half = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
    return {
        "64 random bytes": [os.urandom(64)],
        "unknown PDU type 0x09": [pdu(0x09, b"\x00" * 10)],
        "A-ASSOCIATE-RQ shorter than its length": [good_rq[:-20]],
        "A-ASSOCIATE-RQ items longer than the PDU": [good_rq[:10] + b"\xff" * 60],
        "A-ASSOCIATE-RQ without presentation contexts": [associate_rq(NODE_AET, CALLING, [])],
        "A-ASSOCIATE-RQ protocol version 2": [good_rq[:6] + b"\x00\x02" + good_rq[8:]],
        "abstract syntax with a newline": [associate_rq(NODE_AET, CALLING, newline_syntax)],
        "calling AE with control characters": [associate_rq(NODE_AET, "EVIL\n\x1b[31m", echo_ctx)],
        "P-DATA before an association": [pdv(1, 3, store)],
        "A-RELEASE-RQ before an association": [pdu(A_RELEASE_RQ, b"\x00" * 4)],
        "A-ABORT before an association": [pdu(A_ABORT, b"\x00" * 4)],
        "A-ASSOCIATE-RQ, then a PDU before the answer": [good_rq, pdv(1, 3, store)],
        "second A-ASSOCIATE-RQ": [ASSOCIATE, good_rq],
        "P-DATA on an unproposed context": [ASSOCIATE, pdv(99, 3, store)],
        "PDV longer than its PDU": [
            ASSOCIATE,
            pdu(P_DATA_TF, (5000).to_bytes(4, "big") + b"\x01\x03abc"),
        ],
        "garbage command set": [ASSOCIATE, pdv(1, 3, os.urandom(40))],
        "dataset before its command": [ASSOCIATE, pdv(1, 2, b"\x08\x00\x05\x00CS\x00\x00")],
        "C-STORE-RQ saying no dataset": [ASSOCIATE, pdv(1, 3, no_dataset)],
        "C-FIND-RQ (not offered)": [ASSOCIATE, pdv(1, 3, c_find)],
        "half a dataset, then A-ABORT": [
            ASSOCIATE,
            pdv(1, 3, store),
            pdv(1, 0, half),
            pdu(A_ABORT, b"\x00" * 4),
        ],
        "half a dataset, then silence": [ASSOCIATE, pdv(1, 3, store), pdv(1, 0, half)],
        "half a PDU, then silence": [ASSOCIATE, pdv(1, 3, store)[:20]],
        "PDU announcing 1 GB": [
            ASSOCIATE,
            bytes([P_DATA_TF, 0]) + (1 << 30).to_bytes(4, "big") + b"\x00" * 1000,
        ],
    }


def send_pdus(node: NodeProcess, pdus: list[bytes]) -> str:
    """Send one case on a fresh connection; how the node answered (a PDU type, a DIMSE
    status, or closed)."""
    with RawAssociation(node.port, timeout=15) as a:
        for data in pdus:
            try:
                if data == ASSOCIATE:
                    assert a.associate([(1, CT, [EXPLICIT_LE])], calling=CALLING).accepted
                else:
                    a.send(data)
            except OSError:
                break
        reply = a.read_pdu()
    if reply is None:
        return "closed"
    if reply[0] == P_DATA_TF:
        status = parse_command(reply[1][6:]).get(0x0900, b"\x00\x00")
        return f"status 0x{int.from_bytes(status, 'little'):04X}"
    return f"PDU 0x{reply[0]:02X}"


def test_malformed_pdus_never_crash_the_node(hostile_node: NodeProcess) -> None:
    """Issue #9 item 12 (PDUs): each ends in a rejection, an abort or a failure status; the
    node keeps serving, leaves nothing in staging, and logs wire data escaped."""
    outcomes: dict[str, str] = {}
    for name, pdus in raw_pdu_cases().items():
        outcomes[name] = send_pdus(hostile_node, pdus)
        assert hostile_node.proc.poll() is None, f"node died on {name}"
        assert hostile_node.echoscu(CALLING).returncode == 0, name
    print("\nmalformed PDUs:", outcomes)
    assert len(outcomes) == 23
    assert outcomes["A-ASSOCIATE-RQ protocol version 2"] == "PDU 0x03"  # rejected
    assert outcomes["A-ASSOCIATE-RQ without presentation contexts"] == "PDU 0x03"
    # accepted on purpose: the association stands with its one context rejected (PS3.8), so
    # nothing can be sent on it
    assert outcomes["abstract syntax with a newline"] == "PDU 0x02"
    refused = [n for n, o in outcomes.items() if o != "PDU 0x02"]
    assert len(refused) == 22
    assert all(o in ("closed", "PDU 0x03", "PDU 0x07") or (o.startswith("status 0x") and
               o != "status 0x0000") for n, o in outcomes.items() if n in refused)  # fmt: skip
    staging = hostile_node.storage / ".incoming"

    def swept() -> bool:  # partial transfers go at the next association's end, once idle
        return hostile_node.echoscu(CALLING).returncode == 0 and not list(staging.iterdir())

    wait_until(swept, timeout=30, interval=1.0, what="staging emptied after aborted transfers")
    assert "partial transfer(s) left" in hostile_node.log()
    assert_consistent(hostile_node)
    assert_no_forged_lines(hostile_node.log())


RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def assert_no_forged_lines(log: str) -> None:
    """Every line is a record (timestamp first) or an indented traceback line under one, and
    no terminal control sequence from the wire got through."""
    for line in log.splitlines():
        assert RECORD_START.match(line) or line.startswith(TRACEBACK_INDENT), repr(line)
    assert "\x1b" not in log


def test_oversized_stream_is_aborted(hostile_node: NodeProcess) -> None:
    """A dataset still arriving past twice storage.max_instance_mb is aborted; nothing kept."""
    chunk = (SMALL_CT / "CT_0001.dcm").read_bytes()[400 : 400 + 16000]
    sent = 0
    with RawAssociation(hostile_node.port) as a:
        assert a.associate([(1, CT, [EXPLICIT_LE])], calling=CALLING).accepted
        a.p_data(1, c_store_rq(1, CT.encode(), b"1.2.3.99"), command=True)
        with contextlib.suppress(OSError):  # the node hangs up while we send
            while sent < 500 * 1024 * 1024:
                a.send(pdu(P_DATA_TF, (len(chunk) + 2).to_bytes(4, "big") + b"\x01\x00" + chunk))
                sent += len(chunk)
        assert a.closed_by_node(timeout=20)
    # The node checks arriving sizes once a second; loopback carries a few hundred MB in that
    # second on a fast or busy machine, so the bound only shows the node hung up long before
    # the sender would have finished.
    assert 2 * LIMIT_MB * 1024 * 1024 < sent < 400 * 1024 * 1024
    wait_until(lambda: "max_instance_mb arriving" in hostile_node.log(), timeout=10, what="log")
    wait_until(lambda: not list((hostile_node.storage / ".incoming").iterdir()), timeout=10)
    assert hostile_node.echoscu(CALLING).returncode == 0


def make_senders(root: Path, senders: int, per_sender: int) -> list[Path]:
    """``senders`` folders of ``per_sender`` CT instances each, every one with new UIDs."""
    files = sorted(SMALL_CT.glob("*.dcm"))[:per_sender]
    folders = []
    for i in range(senders):
        folder = root / f"sender{i:02d}"
        folder.mkdir(parents=True)
        for f in files:
            ds = rewrite_dataset(pydicom.dcmread(f), salt=f"load-{root.name}-{i}")
            ds.save_as(folder / f.name, enforce_file_format=True)
        folders.append(folder)
    return folders


def start_storescu(node: NodeProcess, folder: Path, calling: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [dcmtk("storescu"), "-v", "+sd", "-aet", calling, "-aec", NODE_AET, "127.0.0.1",
         str(node.port), str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip


def acknowledged(output: str) -> list[str]:
    """Files storescu got a Success response for, from its verbose output."""
    done, current = [], None
    for line in output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
            current = None
    return done


def test_load_32_associations_x_20_instances(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """All acknowledged = stored = indexed; then 50 associations at once against a limit of
    40: the extra ones are rejected, the node goes on."""
    node = node_factory(node={"max_associations": 40})
    folders = make_senders(tmp_path / "load", 32, 20)
    procs = [start_storescu(node, f, f"LOAD{i:02d}") for i, f in enumerate(folders)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-500:] for o in outputs if "Error" in o][:2]
    acked = [a for o in outputs for a in acknowledged(o)]
    assert len(acked) == 640
    report = assert_consistent(node)
    assert report.checked == 640 == len(list(node.storage.rglob("*.dcm")))
    held = []
    try:
        for _ in range(50):
            a = RawAssociation(node.port)
            held.append(a)
            a.associate([(1, VERIFICATION, [EXPLICIT_LE])], calling="HOLDER")
        accepted = sum(bool(a.negotiated.accepted) for a in held)
        rejected = sum(a.negotiated.rejected is not None for a in held)
        assert (accepted, rejected) == (40, 10)
    finally:
        for a in held:
            a.close()
    wait_until(lambda: node.echoscu().returncode == 0, timeout=20, what="slots freed")
    assert node.stop() == 0


def test_sigkill_during_transfers_loses_nothing_acknowledged(
    tmp_path: Path, node_factory: Callable[..., NodeProcess]
) -> None:
    """SIGKILL mid-transfer: every acknowledged instance is stored and indexed after a
    restart; start-up reconciles files without rows; staging is swept."""
    node = node_factory()
    folders = make_senders(tmp_path / "kill", 4, 40)
    procs = [start_storescu(node, f, f"KILL{i}") for i, f in enumerate(folders)]
    wait_until(lambda: len(list(node.storage.rglob("*.dcm"))) >= 40, timeout=60, what="half")
    os.kill(node.proc.pid, signal.SIGKILL)
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    acked = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
             for o in outputs for f in acknowledged(o)}  # fmt: skip
    assert acked, "some instances were acknowledged before the kill"
    restarted = start_node(node.config_path.parent, node.config, log_name="restart.log")
    try:
        stored = indexed_uids(restarted)
        assert acked <= stored, f"{len(acked - stored)} acknowledged instances lost"
        assert_consistent(restarted)
    finally:
        assert restarted.stop() == 0


def test_deleted_index_refused_then_rebuilt(node_factory: Callable[..., NodeProcess]) -> None:
    """Issue #9 item 9: storing into a deleted index is refused (never acknowledged into an
    unlinked file); after a restart the node says to reindex; reindex restores the rows."""
    node = node_factory()
    files = sorted(SMALL_CT.glob("*.dcm"))
    assert node.storescu(*files[:3]).returncode == 0
    index = node.storage / "index.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    refused = node.storescu(files[3])
    assert refused.returncode != 0
    assert "Refused: OutOfResources" in refused.stdout + refused.stderr
    wait_until(lambda: "was deleted while the node runs" in node.log(), timeout=10, what="ERROR")
    assert "refused with status 0xA702" in node.log()
    uid = pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID
    assert not list(node.storage.rglob(f"{uid}.dcm")), "refused, so not stored either"
    assert node.stop() == 0
    restarted = start_node(node.config_path.parent, node.config, log_name="restart.log")
    wait_until(lambda: "dicom-node reindex" in restarted.log(), timeout=30, what="hint")
    assert restarted.stop() == 0
    assert cli(["reindex", "--config", str(node.config_path)]) == 0
    engine = make_engine(node.db_url)
    try:
        with session_factory(engine)() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 3
    finally:
        engine.dispose()
