"""Tables: state columns hold plain strings and read back as enums."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.models import Job, utcnow
from dicom_node.states import JobState


def test_state_column_round_trip(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    migrate(engine)
    now = utcnow()
    with session_factory(engine)() as s:
        s.add(Job(ct_series_uid="1", mr_series_uid="2", created_at=now, updated_at=now))
        s.commit()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM jobs")).scalar() == "queued"
        conn.execute(text("UPDATE jobs SET state = 'done'"))
        conn.commit()
    with session_factory(engine)() as s:
        job = s.query(Job).one()
        assert job.state is JobState.DONE
    engine.dispose()
