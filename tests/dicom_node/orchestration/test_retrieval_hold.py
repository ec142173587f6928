"""The retrieval hold: a series retrieved from the PACS is usable only once complete."""

from __future__ import annotations

from sqlalchemy import delete, select

from dicom_node.models import Instance, Prefetch, Retrieval, utcnow
from dicom_node.orchestration.retrieval_hold import held_series, stored_count
from dicom_node.states import PrefetchMethod, PrefetchState, PrefetchTrigger, RetrievalState
from tests.support.data import SMALL_MR, require_small_fixtures
from tests.support.indexed import IndexedNode
from tests.support.prefetch import first_uid


def _retrieval(node: IndexedNode, series_uid: str, state: RetrievalState, expected: int) -> None:
    now = utcnow()
    with node.sessions() as s:
        row = Prefetch(
            ct_series_uid="1.2.3",
            ct_revision=1,
            trigger=PrefetchTrigger.AUTO,
            method=PrefetchMethod.MOVE,
            state=PrefetchState.RETRIEVING,
            created_at=now,
            updated_at=now,
        )
        s.add(row)
        s.flush()
        s.add(
            Retrieval(
                prefetch_id=row.id,
                series_uid=series_uid,
                study_uid="1.2",
                state=state,
                expected=expected,
                started_at=now,
            )
        )
        s.commit()


def test_hold_follows_the_newest_retrieval(indexed_node: IndexedNode) -> None:
    require_small_fixtures()
    n = indexed_node.ingest(SMALL_MR)
    uid = first_uid(SMALL_MR, "SeriesInstanceUID")
    with indexed_node.sessions() as s:
        assert stored_count(s, uid) == n
        assert held_series(s, [uid, "9.9"]) == {}  # never retrieved: received, never held
    _retrieval(indexed_node, uid, RetrievalState.RETRIEVING, n)
    with indexed_node.sessions() as s:
        assert "retrieving" in held_series(s, [uid])[uid]
    _retrieval(indexed_node, uid, RetrievalState.PARTIAL, n)
    with indexed_node.sessions() as s:
        assert "partial" in held_series(s, [uid])[uid]
    _retrieval(indexed_node, uid, RetrievalState.COMPLETE, n)
    with indexed_node.sessions() as s:
        assert held_series(s, [uid]) == {}  # the newest retrieval is complete
        s.execute(delete(Instance).where(Instance.id == s.scalar(select(Instance.id).limit(1))))
        s.commit()
    with indexed_node.sessions() as s:
        assert held_series(s, [uid]) == {
            uid: f"only {n - 1} of the {n} retrieved instances are stored"
        }
