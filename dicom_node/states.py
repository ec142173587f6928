"""The node's vocabulary of states and kinds, as string enums (one definition each).

The values are what the index stores and what the CLI, the logs and the docs show; a
:class:`enum.StrEnum` compares equal to its value, so rows written as plain strings read back
as the same state. Which transitions are allowed, and where they happen, is decided in
:mod:`dicom_node.orchestration.jobs` (jobs and sends) and
:mod:`dicom_node.orchestration.completion` (series).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a CT-MR fusion job stands.

    ``queued -> registering -> fusing -> writing -> sending -> done``; a failed attempt goes
    back to ``queued`` (with backoff) or ends ``failed``; an admin may ``cancel``.
    """

    QUEUED = "queued"
    REGISTERING = "registering"
    FUSING = "fusing"
    WRITING = "writing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_active(self) -> bool:
        """A worker (or the send retries) holds the job."""
        return self in ACTIVE_JOB_STATES

    @property
    def is_terminal(self) -> bool:
        """Nothing happens to the job any more unless an admin retries it."""
        return self in TERMINAL_JOB_STATES


ACTIVE_JOB_STATES: frozenset[JobState] = frozenset(
    {JobState.REGISTERING, JobState.FUSING, JobState.WRITING, JobState.SENDING}
)
TERMINAL_JOB_STATES: frozenset[JobState] = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.CANCELLED}
)


class SendState(StrEnum):
    """Where the delivery of one job's derived objects to one destination stands."""

    PENDING = "pending"
    SENDING = "sending"
    RETRY = "retry"
    DONE = "done"
    FAILED = "failed"


OPEN_SEND_STATES: frozenset[SendState] = frozenset(
    {SendState.PENDING, SendState.SENDING, SendState.RETRY}
)
"""A send in one of these states may still deliver: its job is not finished."""


class SeriesState(StrEnum):
    """A received series: instances still arriving, or quiet long enough to be complete."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class PairingOutcome(StrEnum):
    """The decision recorded for one CT series revision."""

    PAIRED = "paired"
    WAITING = "waiting"
    EXPIRED = "expired"
    IGNORED = "ignored"


class AssociationResult(StrEnum):
    """How an association with a sender ended (a metrics label)."""

    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class StoreResult(StrEnum):
    """What one received C-STORE came to (a metrics label)."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    FAILED = "failed"


class DerivedKind(StrEnum):
    """A kind of derived object the node writes and a destination may receive."""

    FUSED = "fused"
    REGISTERED_MR = "registered_mr"
    REG = "reg"


ALL_DERIVED_KINDS: tuple[DerivedKind, ...] = tuple(DerivedKind)
"""Every derived kind, in the order they are written and sent."""


class Stage(StrEnum):
    """A step of the volume pipeline, as reported while a job or ``dicom-node fuse`` runs."""

    READ = "read"
    REGISTER = "register"
    RESAMPLE = "resample"
    FUSE = "fuse"
    DERIVE = "derive"
    WRITE = "write"
    PREVIEW = "preview"


STAGE_JOB_STATE: dict[Stage, JobState] = {
    Stage.REGISTER: JobState.REGISTERING,
    Stage.RESAMPLE: JobState.REGISTERING,
    Stage.FUSE: JobState.FUSING,
    Stage.DERIVE: JobState.WRITING,
    Stage.WRITE: JobState.WRITING,
}
"""The job state a worker shows while the pipeline is in a stage (others leave it as it is)."""
