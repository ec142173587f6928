"""SQLAlchemy table classes of the index and the job table (the only module that defines tables).

Received data: patients, studies, series, instances (patient names live only here, never in
INFO logs). Orchestration: series progress, pairing decisions, jobs, job stages, sends and sent
instances. Schema changes are Alembic revisions in :mod:`dicom_node.migrations`. Times are
naive UTC. State columns hold the values of the enums in :mod:`dicom_node.states` and read back
as those enums.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from dicom_node.states import (
    JobState,
    PairingOutcome,
    PrefetchEventKind,
    PrefetchMethod,
    PrefetchState,
    PrefetchTrigger,
    RetrievalState,
    SendState,
    SeriesState,
)

UID = String(64)
E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E], Generic[E]):
    """A state column: stored as its plain string value, read back as the enum member.

    Plain strings (no database enum type, no CHECK constraint) keep the schema the same on
    SQLite and PostgreSQL and let a new state be added without a migration.
    """

    impl = String(16)
    cache_ok = True

    def __init__(self, enum: type[E]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else str(self.enum(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


def utcnow() -> datetime:
    """Now as a naive UTC datetime: the index stores naive UTC times."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Patient(Base):
    """A patient, identified by PatientID within IssuerOfPatientID ('' when absent)."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """A study (StudyInstanceUID) of one patient."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A received series, with what pairing needs and its completion state.

    ``state`` is ``receiving`` while instances arrive; the pairing module sets it (and
    ``completed_at``) once the series has been quiet long enough.
    """

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_date: Mapped[str | None] = mapped_column(String(8))
    series_time: Mapped[str | None] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    image_orientation_patient: Mapped[str | None] = mapped_column(String(128))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    image_type: Mapped[str | None] = mapped_column(String(128))
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    state: Mapped[SeriesState] = mapped_column(
        EnumText(SeriesState), default=SeriesState.RECEIVING, index=True
    )
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored file. ``path`` is relative to ``storage.root``.

    ``sha256`` is the digest of the dataset bytes as received (after the file meta), so the
    same instance re-sent by another AE compares equal.
    """

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_position_patient: Mapped[str | None] = mapped_column(String(128))
    slice_position: Mapped[float | None] = mapped_column(Float)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    calling_aet: Mapped[str] = mapped_column(String(16))

    series: Mapped[Series] = relationship(back_populates="instances")


class SeriesProgress(Base):
    """Completion bookkeeping of one received series: quiet period passed, revision, content."""

    __tablename__ = "series_progress"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class PairingDecision(Base):
    """One pairing decision for a CT series revision: paired, waiting, expired or ignored."""

    __tablename__ = "pairing_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ct_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    ct_revision: Mapped[int] = mapped_column(Integer, default=1)
    mr_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[PairingOutcome] = mapped_column(EnumText(PairingOutcome), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime] = mapped_column(DateTime)
    window_closes_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Job(Base):
    """A CT-MR fusion job: registering, fusing, writing and sending one pair."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    state: Mapped[JobState] = mapped_column(EnumText(JobState), index=True, default=JobState.QUEUED)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    ct_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    mr_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    ct_revision: Mapped[int] = mapped_column(Integer, default=1)
    mr_revision: Mapped[int] = mapped_column(Integer, default=1)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    pairing_reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    not_before: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    output_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cleaned_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    stages: Mapped[list[JobStage]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobStage.id"
    )
    sends: Mapped[list[Send]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Send.id"
    )


class JobStage(Base):
    """One stage of one attempt of a job, with its start and end times and error."""

    __tablename__ = "job_stages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    stage: Mapped[JobState] = mapped_column(EnumText(JobState))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    job: Mapped[Job] = relationship(back_populates="stages")


class Send(Base):
    """The send of one job's derived objects to one destination, with its own retries."""

    __tablename__ = "sends"
    __table_args__ = (UniqueConstraint("job_id", "destination", name="uq_sends_job_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kinds: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[SendState] = mapped_column(
        EnumText(SendState), index=True, default=SendState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    acked: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    job: Mapped[Job] = relationship(back_populates="sends")
    acks: Mapped[list[SentInstance]] = relationship(
        back_populates="send", cascade="all, delete-orphan"
    )


class SentInstance(Base):
    """One derived instance a destination acknowledged with Success (never sent again)."""

    __tablename__ = "sent_instances"
    __table_args__ = (UniqueConstraint("send_id", "sop_instance_uid", name="uq_sent_instance"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    send_id: Mapped[int] = mapped_column(ForeignKey("sends.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    acked_at: Mapped[datetime] = mapped_column(DateTime)

    send: Mapped[Send] = relationship(back_populates="acks")


class Prefetch(Base):
    """The prefetch of an MR from the PACS for one CT series revision (one row per run).

    ``reason`` says why it ended as it did (or why the last attempt failed); every query,
    candidate, choice and retrieval is a :class:`PrefetchEvent`.
    """

    __tablename__ = "prefetches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ct_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    ct_revision: Mapped[int] = mapped_column(Integer, default=1)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    trigger: Mapped[PrefetchTrigger] = mapped_column(EnumText(PrefetchTrigger))
    source: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[PrefetchMethod] = mapped_column(EnumText(PrefetchMethod))
    state: Mapped[PrefetchState] = mapped_column(
        EnumText(PrefetchState), index=True, default=PrefetchState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    not_before: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    events: Mapped[list[PrefetchEvent]] = relationship(
        back_populates="prefetch", cascade="all, delete-orphan", order_by="PrefetchEvent.id"
    )
    retrievals: Mapped[list[Retrieval]] = relationship(
        back_populates="prefetch", cascade="all, delete-orphan", order_by="Retrieval.id"
    )


class PrefetchEvent(Base):
    """One step of a prefetch attempt (query, candidate, choice, retrieval, outcome) and why."""

    __tablename__ = "prefetch_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefetch_id: Mapped[int] = mapped_column(
        ForeignKey("prefetches.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    kind: Mapped[PrefetchEventKind] = mapped_column(EnumText(PrefetchEventKind))
    series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime)

    prefetch: Mapped[Prefetch] = relationship(back_populates="events")


class Retrieval(Base):
    """One C-MOVE / C-GET of one series; pairing uses the series only once one is complete.

    ``expected`` is the PACS's instance count (series-level C-FIND, or the retrieve's
    sub-operation total when larger); the sub-operation counts are the PACS's final answer.
    """

    __tablename__ = "retrievals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefetch_id: Mapped[int] = mapped_column(
        ForeignKey("prefetches.id", ondelete="CASCADE"), index=True
    )
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[RetrievalState] = mapped_column(
        EnumText(RetrievalState), default=RetrievalState.RETRIEVING
    )
    expected: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    warning: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    prefetch: Mapped[Prefetch] = relationship(back_populates="retrievals")
