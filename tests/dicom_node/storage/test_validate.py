"""The full check of received files: every malformed case refused with its status, every
readable variation accepted (no network: the store on a real SQLite index)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.errors import EncodingMismatchError, InvalidDatasetError, NodeError
from dicom_node.models import Instance
from dicom_node.storage.pixels import PixelLimits
from dicom_node.storage.store import Expected, Store
from dicom_node.storage.validate import CHUNK, check_file
from tests.support.data import SMALL_CT
from tests.support.malformed import Case, all_cases, encode, write_part10

LIMIT_MB = 2

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cases() -> list[Case]:
    fixture = SMALL_CT / "CT_0001.dcm"
    if not fixture.exists():
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return all_cases(fixture, limit_mb=LIMIT_MB)


CASES = _cases()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'index.sqlite3'}")
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Iterator[Store]:
    s = Store(
        tmp_path_factory.mktemp("storage"),
        session_factory(engine),
        min_free_mb=1,
        max_instance_mb=LIMIT_MB,
    )
    yield s
    s.close()


def test_the_case_list_is_the_documented_one() -> None:
    if not CASES:
        pytest.skip("small fixtures missing")
    refused = [c for c in CASES if not c.accepted]
    assert len(CASES) == 90
    assert len(refused) == 79
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_gets_its_status(store: Store, engine: Engine, case: Case) -> None:
    staged = write_part10(case, store.staging)
    expected = Expected(case.context_class, case.transfer_syntax, case.request_class)
    try:
        store.store_received(staged, expected=expected, calling_aet="FUZZ", peer="test")
        status, why = 0, "stored"
    except NodeError as exc:
        status, why = exc.status, str(exc)
    finally:
        staged.unlink(missing_ok=True)
    assert status == case.expect, f"{case.name}: got 0x{status:04X} ({why})"
    uid = case.sop_instance.decode("latin-1")
    with session_factory(engine)() as s:
        rows = s.scalar(select(func.count()).where(Instance.sop_instance_uid == uid))
    assert rows == (1 if case.accepted else 0)
    if not case.accepted:
        assert len(why) > 5  # a reason a person can act on


def test_large_values_are_streamed(tmp_path: Path) -> None:
    """A dataset larger than the read chunk: checked in bounded pieces, hash over all bytes."""
    fixture = SMALL_CT / "CT_0001.dcm"
    if not fixture.exists():
        pytest.skip("small fixtures missing")
    case = next(c for c in CASES if c.name.startswith("good, Explicit"))
    import hashlib

    import pydicom

    ds = pydicom.dcmread(fixture)
    frames = (3 * CHUNK) // (ds.Rows * ds.Columns * 2) + 1
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2 * frames)
    big = Case("big", "accepted", encode(ds), 0, case.sop_instance)
    path = write_part10(big, tmp_path)
    checked = check_file(path, limits=PixelLimits(8192))
    assert checked.frames == frames
    assert checked.sha256 == hashlib.sha256(big.dataset).hexdigest()
    assert checked.size == path.stat().st_size


def test_negotiated_syntax_must_be_the_meta_one(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name.startswith("good, Explicit"))
    path = write_part10(case, tmp_path)
    with pytest.raises(EncodingMismatchError, match="negotiated"):
        check_file(path, limits=PixelLimits(8192), transfer_syntax="1.2.840.10008.1.2")
    path.write_bytes(b"not dicom at all")
    with pytest.raises(InvalidDatasetError, match="DICM"):
        check_file(path, limits=PixelLimits(8192))
