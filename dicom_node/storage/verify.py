"""``dicom-node verify``: is every stored instance still what was acknowledged, and readable?

For every index row: the file exists, has the indexed size and SHA-256 (of the dataset bytes,
as received), and passes the full check of :mod:`dicom_node.storage.validate` (instances
stored by releases that acknowledged truncated or mismatched data show up here; a re-send of
such an instance replaces it). Files under the storage root without an index row are listed
too (``dicom-node reindex`` indexes them). Read-only: nothing is changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import NodeError
from dicom_node.models import Instance
from dicom_node.storage.pixels import PixelLimits
from dicom_node.storage.reindex import series_folders
from dicom_node.storage.validate import check_file

BATCH = 1000


@dataclass(frozen=True)
class Problem:
    """One stored instance that is not as acknowledged, or cannot be read."""

    path: str
    sop_instance_uid: str | None
    problem: str


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`."""

    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing to report."""
        return not self.problems and not self.unindexed


def _rows(sessions: sessionmaker[Session]) -> Iterator[Instance]:
    with sessions() as session:
        stmt = select(Instance).order_by(Instance.id).execution_options(yield_per=BATCH)
        yield from session.scalars(stmt)


def check_instance(root: Path, row: Instance, limits: PixelLimits) -> str | None:
    """What is wrong with the stored file of index row ``row`` (None: nothing)."""
    path = root / row.path
    try:
        checked = check_file(path, limits=limits)
    except FileNotFoundError:
        return "file missing"
    except NodeError as exc:
        return f"unreadable: {exc}"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if checked.size != row.size:
        return f"size {checked.size} bytes, indexed {row.size}"
    if checked.sha256 != row.sha256:
        return "content differs from the acknowledged instance (SHA-256)"
    if checked.transfer_syntax_uid != row.transfer_syntax_uid:
        return f"transfer syntax {checked.transfer_syntax_uid}, indexed {row.transfer_syntax_uid}"
    return None


def verify(root: Path, sessions: sessionmaker[Session], limits: PixelLimits) -> VerifyReport:
    """Check every indexed instance under ``root`` and look for files without a row."""
    report = VerifyReport()
    indexed: set[str] = set()
    for row in _rows(sessions):
        report.checked += 1
        indexed.add(row.path)
        problem = check_instance(root, row, limits)
        if problem is not None:
            report.problems.append(Problem(row.path, row.sop_instance_uid, problem))
    for folder in series_folders(root):
        for path in sorted(folder.glob("*.dcm")):
            rel = path.relative_to(root).as_posix()
            if rel not in indexed:
                report.unindexed.append(rel)
    return report
