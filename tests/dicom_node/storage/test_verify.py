"""``verify``: stored instances missing, changed or unreadable, and files without rows."""

from __future__ import annotations

from pathlib import Path

from dicom_node.storage.pixels import PixelLimits
from dicom_node.storage.verify import verify
from tests.support.indexed import IndexedNode


def test_verify_reports_each_kind_of_problem(
    indexed_node: IndexedNode, ct_files: list[Path]
) -> None:
    indexed_node.ingest(ct_files[0].parent)
    root = indexed_node.store.root
    limits = PixelLimits(8192)
    clean = verify(root, indexed_node.sessions, limits)
    assert clean.ok and clean.checked == len(ct_files)
    paths = sorted(root.rglob("*.dcm"))
    paths[0].unlink()
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-10])
    changed = bytearray(paths[2].read_bytes())
    changed[-1] ^= 0xFF
    paths[2].write_bytes(bytes(changed))
    (paths[3].parent / "1.2.3.dcm").write_bytes(data)
    report = verify(root, indexed_node.sessions, limits)
    problems = {Path(p.path).name: p.problem for p in report.problems}
    assert problems[paths[0].name] == "file missing"
    assert problems[paths[1].name].startswith("unreadable: the data ends inside")
    assert "SHA-256" in problems[paths[2].name]
    assert [Path(u).name for u in report.unindexed] == ["1.2.3.dcm"]
    assert not report.ok
