"""What the REST API answers (JSON, in the OpenAPI schema) and the pages show.

Times are UTC (``...Z`` in JSON). Patient data: a job carries the Patient ID (shown to an
authenticated admin, as ``dicom-node jobs`` does); patient names never appear.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from dicom_node.states import JobState, SendState, SeriesState


class SendView(BaseModel):
    """The delivery of one job's derived objects to one destination."""

    destination: str
    kinds: list[str]
    state: SendState
    acked: int
    total: int
    attempts: int
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    updated_at: datetime | None = None


class StageView(BaseModel):
    """One stage of one attempt of a job."""

    attempt: int
    state: JobState
    name: str = Field(description="register, fuse, derive or send")
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float | None = None
    error: str | None = None


class JobSummary(BaseModel):
    """A job as the jobs list shows it."""

    id: int
    state: JobState
    patient_id: str
    ct_series_uid: str
    mr_series_uid: str
    ct_description: str | None = None
    mr_description: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    attempts: int
    stage_seconds: dict[str, float] = Field(
        default_factory=dict, description="seconds spent per stage name, all attempts"
    )
    running_seconds: float | None = Field(
        default=None, description="how long the job has been in its current active stage"
    )
    error: str | None = None
    sends: list[SendView] = Field(default_factory=list)


class JobDetail(JobSummary):
    """A job with everything the job page shows."""

    issuer_of_patient_id: str = ""
    pairing_reason: str = ""
    revision: int = 0
    ct_revision: int = 1
    mr_revision: int = 1
    worker_id: str | None = None
    heartbeat_at: datetime | None = None
    not_before: datetime | None = None
    cleaned_at: datetime | None = None
    stages: list[StageView] = Field(default_factory=list)
    quality: dict[str, Any] = Field(
        default_factory=dict, description="registration quality figures (from the manifest)"
    )
    warnings: list[str] = Field(default_factory=list)
    pipeline_seconds: dict[str, float] = Field(default_factory=dict)
    has_preview: bool = False


class ActionResult(BaseModel):
    """The answer to a retry or cancel request."""

    job: int
    changed: bool
    state: JobState
    message: str


class SeriesView(BaseModel):
    """A received series and its completion state."""

    series_instance_uid: str
    modality: str | None = None
    description: str | None = None
    instances: int
    calling_aet: str
    state: SeriesState
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None = None


class DiskView(BaseModel):
    """Free space of the storage disk against the configured floor."""

    path: str
    free_bytes: int
    total_bytes: int
    min_free_bytes: int
    ok: bool


class ErrorView(BaseModel):
    """A recent problem: a failed job or send, or a warning the node logged."""

    at: datetime
    source: str
    message: str


class Dashboard(BaseModel):
    """Everything the dashboard shows."""

    generated_at: datetime
    associations_today: dict[str, int]
    instances_today: int
    series_by_state: dict[str, int]
    recent_series: list[SeriesView]
    jobs_by_state: dict[str, int]
    active_jobs: list[JobSummary]
    recent_jobs: list[JobSummary]
    disk: DiskView
    worker_alive: bool | None
    errors: list[ErrorView]


class EchoResult(BaseModel):
    """The outcome of a C-ECHO to a destination."""

    destination: str
    ok: bool
    message: str
    seconds: float


class FieldErrorView(BaseModel):
    """One invalid key of a configuration edit."""

    key: str
    message: str


class ConfigSaved(BaseModel):
    """The answer to a configuration save."""

    changed: bool
    applied: bool
    version: str
    diff: list[str]
    restart_keys: list[str] = Field(description="changed keys that need a restart of serve")


class Problem(BaseModel):
    """An error answer: what went wrong, and the failing keys of an invalid configuration."""

    detail: str
    errors: list[FieldErrorView] = Field(default_factory=list)
