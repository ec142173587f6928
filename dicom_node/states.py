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


class PrefetchMethod(StrEnum):
    """How a prefetch retrieves a series from the PACS (``prefetch.method``)."""

    MOVE = "move"
    """C-MOVE with the node's own AE title as destination: the PACS stores to the node's SCP."""
    GET = "get"
    """C-GET: the PACS sends the instances back on the same association (SCP role)."""


class PrefetchTrigger(StrEnum):
    """Who started a prefetch."""

    AUTO = "auto"
    """The scheduler, for a CT that waits for an MR."""
    MANUAL = "manual"
    """An admin, with ``dicom-node prefetch PATIENT_ID``."""


class PrefetchState(StrEnum):
    """Where the prefetch of an MR for one CT series revision stands.

    ``pending -> querying -> retrieving -> retrieved``; an attempt that fails (PACS down, a
    partial retrieval) goes to ``retry`` with backoff, and to ``failed`` after
    ``prefetch.max_attempts``; a PACS without a usable MR ends ``not_found``; a CT that no
    longer waits (its MR arrived another way) ends ``skipped``.
    """

    PENDING = "pending"
    QUERYING = "querying"
    RETRIEVING = "retrieving"
    RETRY = "retry"
    RETRIEVED = "retrieved"
    NOT_FOUND = "not_found"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def is_open(self) -> bool:
        """The prefetch may still retrieve something: its CT is "prefetching"."""
        return self in OPEN_PREFETCH_STATES


OPEN_PREFETCH_STATES: frozenset[PrefetchState] = frozenset(
    {PrefetchState.PENDING, PrefetchState.QUERYING, PrefetchState.RETRIEVING, PrefetchState.RETRY}
)
RUNNING_PREFETCH_STATES: frozenset[PrefetchState] = frozenset(
    {PrefetchState.QUERYING, PrefetchState.RETRIEVING}
)
"""A process is working on the prefetch (it heartbeats; a stale one is taken back)."""


class PrefetchEventKind(StrEnum):
    """One recorded step of a prefetch (each with its reason in words)."""

    QUERY = "query"
    CANDIDATE = "candidate"
    CHOICE = "choice"
    RETRIEVE = "retrieve"
    OUTCOME = "outcome"


class RetrievalState(StrEnum):
    """The retrieval of one series from the PACS; pairing uses the series only when complete."""

    RETRIEVING = "retrieving"
    COMPLETE = "complete"
    PARTIAL = "partial"
    FAILED = "failed"


class CtWaitState(StrEnum):
    """How ``dicom-node jobs`` shows a CT that has no job yet."""

    WAITING = "waiting"
    """Waiting for an MR to arrive (or for its pairing window to close)."""
    PREFETCHING = "prefetching"
    """Waiting for a prefetch of its MR from the PACS."""


class JobAction(StrEnum):
    """Something an admin asks of a job (CLI or console); each one is audited."""

    RETRY = "retry"
    CANCEL = "cancel"
    ACCEPT_REGISTRATION = "accept-registration"


class AuditEvent(StrEnum):
    """A kind of audit record (the ``event`` field of the audit log; see docs/audit.md)."""

    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    ASSOCIATION_START = "association-start"
    ASSOCIATION_END = "association-end"
    NODE_AUTHENTICATION_FAILURE = "node-authentication-failure"
    INSTANCES_RECEIVED = "instances-received"
    INSTANCES_SENT = "instances-sent"
    CONFIG_CHANGE = "config-change"
    CERTIFICATE_CHANGE = "certificate-change"
    JOB_ACTION = "job-action"
    QUERY = "query"
    USER_LOGIN = "user-login"
    USER_LOGOUT = "user-logout"


class CheckSeverity(StrEnum):
    """How bad one finding of ``dicom-node config check`` is (an error fails the check)."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


class Listener(StrEnum):
    """Which of the node's DICOM ports an association came in on."""

    PLAIN = "plain"
    TLS = "tls"
