"""Exception classes of the node, with the DIMSE status and CLI exit code each maps to.

Every error the node raises on purpose derives from :class:`NodeError`; its ``status`` is the
DIMSE status a C-STORE handler returns for it, its ``exit_code`` the process exit code the CLI
uses, and ``retryable`` says whether the same work may succeed if tried again later (a peer
that was down, a full disk) or will fail the same way every time (unreadable data, an
unreliable registration, a broken installation). The worker retries a job only for the former.
"""

from __future__ import annotations

# CLI exit codes (sysexits-like, distinct per cause).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_NETWORK = 69  # EX_UNAVAILABLE
EXIT_DATA = 65  # EX_DATAERR
EXIT_IO = 74  # EX_IOERR

# DIMSE statuses used by the C-STORE SCP.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110


class NodeError(Exception):
    """Base class of the node's own errors."""

    status: int = STATUS_PROCESSING_FAILURE
    exit_code: int = EXIT_FAILURE
    retryable: bool = False


class ConfigError(NodeError):
    """A configuration file is missing, unreadable or invalid."""

    exit_code = EXIT_CONFIG


class InvalidUIDError(NodeError):
    """A UID is not a valid DICOM UID and must not become a path part."""

    status = STATUS_CANNOT_UNDERSTAND
    exit_code = EXIT_DATA


class InvalidDatasetError(NodeError):
    """A received dataset cannot be parsed or lacks required attributes."""

    status = STATUS_CANNOT_UNDERSTAND
    exit_code = EXIT_DATA


class SOPClassMismatchError(InvalidDatasetError):
    """The dataset's SOPClassUID differs from the SOP class negotiated for it."""

    status = STATUS_DATASET_MISMATCH


class StorageFullError(NodeError):
    """Free disk space is below the configured floor, or a write failed for lack of space."""

    status = STATUS_OUT_OF_RESOURCES
    exit_code = EXIT_IO
    retryable = True


class StorageError(NodeError):
    """Writing a file or its index row failed."""

    status = STATUS_OUT_OF_RESOURCES
    exit_code = EXIT_IO
    retryable = True


class ConflictingInstanceError(NodeError):
    """An instance with a known SOPInstanceUID arrived with different content."""

    status = STATUS_DATASET_MISMATCH
    exit_code = EXIT_DATA


class NetworkError(NodeError):
    """An association could not be made or a peer failed a request."""

    exit_code = EXIT_NETWORK
    retryable = True


class SendError(NetworkError):
    """A C-STORE send was partial or failed after every retry.

    ``sent``: instances acknowledged; ``failed``: SOPInstanceUID (or unreadable file path) ->
    reason for each instance not acknowledged; ``attempts``: associations tried.
    """

    def __init__(
        self,
        message: str,
        *,
        sent: int = 0,
        failed: dict[str, str] | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.sent = sent
        self.failed: dict[str, str] = dict(failed or {})
        self.attempts = attempts


class QueryRetrieveError(NetworkError):
    """A C-FIND, C-MOVE or C-GET against the PACS failed (no association, a failure status).

    Retryable: the PACS may be down or busy; a partial retrieval is not an error but a
    :class:`dicom_node.net.qr.RetrieveResult` that is not complete.
    """


class SeriesError(NodeError):
    """A stored series cannot be read as a volume (gap, tilt, mixed sizes, ...)."""

    exit_code = EXIT_DATA


class DeriveError(NodeError):
    """A derived DICOM object could not be created."""

    exit_code = EXIT_DATA


class PipelineError(NodeError):
    """The pipeline could not produce derived objects from these inputs."""

    exit_code = EXIT_DATA


class RegistrationUnreliableError(PipelineError):
    """The registration looks unreliable: nothing is derived or sent without a person's review.

    ``quality`` holds the registration quality figures (JSON-ready) when there were any.
    """

    def __init__(self, message: str, *, quality: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.quality = quality


class ModelError(NodeError):
    """The fusion model cannot be used (missing or corrupt weights, unusable device)."""


class SourceSeriesMissingError(SeriesError):
    """A job's source series is no longer in the index (deleted by retention, say)."""


class UsageError(NodeError):
    """The command line names something that does not exist."""

    exit_code = EXIT_USAGE


class TlsConfigError(ConfigError):
    """A certificate, private key or CA file cannot be used for DICOM TLS."""
