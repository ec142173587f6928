"""Query/Retrieve SCU against a PACS: Study Root C-FIND, C-MOVE and C-GET.

* :class:`QueryAssociation`: one association (Study Root Query/Retrieve - FIND) for a run of
  C-FINDs; each query is a mapping keyword -> value (an empty value asks for the attribute), and
  each match comes back as the same keywords with their values as text (multi-valued attributes
  joined with a backslash). A failure status, or no answer, raises :class:`QueryRetrieveError`.
* :func:`move_series`: series-level C-MOVE (Study Root - MOVE) to a destination AE title (the
  node's own): the PACS opens its own association to the node's Storage SCP (:mod:`.scp`), which
  stores and indexes what arrives.
* :func:`get_series`: series-level C-GET (Study Root - GET) with a storage presentation context
  and SCP role selection (PS3.7 D.3.3.4) for each SOP class asked for; every instance the PACS
  sends back on the association goes through :meth:`Store.store_encoded`, the path the Storage
  SCP uses, so validation, duplicate rules and indexing are identical, and a
  :class:`NodeError` becomes that sub-operation's failure status.
* A retrieval is :attr:`RetrieveResult.complete` only when its final status is Success and no
  sub-operation failed or ended with a warning; anything else (Warning 0xB000, a failure
  status, no final answer) is partial and the caller must not use the series as complete.

Patient identifiers are never logged here above DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.audit import Transfers
from dicom_node.errors import STATUS_PROCESSING_FAILURE, NodeError, QueryRetrieveError
from dicom_node.net.scp import MAX_PDU_SIZE, STORAGE_PREFERENCE, UNCOMPRESSED
from dicom_node.net.scu import DestinationLike, describe
from dicom_node.net.tls import destination_context
from dicom_node.storage.store import Store

log = logging.getLogger(__name__)

FIND_MODEL = str(StudyRootQueryRetrieveInformationModelFind)
MOVE_MODEL = str(StudyRootQueryRetrieveInformationModelMove)
GET_MODEL = str(StudyRootQueryRetrieveInformationModelGet)
QR_SOP_CLASSES: tuple[str, ...] = (FIND_MODEL, MOVE_MODEL, GET_MODEL)
"""The SOP classes this SCU uses (for the conformance statement)."""
QR_TRANSFER_SYNTAXES: tuple[str, ...] = UNCOMPRESSED[:2]
"""Proposed for the Query/Retrieve contexts: Explicit and Implicit VR Little Endian."""

STATUS_SUCCESS = 0x0000
STATUS_PENDING = frozenset({0xFF00, 0xFF01})
STATUS_SUBOPS_WARNING = 0xB000
"""Final C-MOVE/C-GET status: sub-operations complete, one or more failures or warnings."""
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801

STATUS_MEANINGS: dict[int, str] = {
    0xA700: "out of resources",
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    STATUS_MOVE_DESTINATION_UNKNOWN: "move destination unknown to the PACS",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
    STATUS_SUBOPS_WARNING: "sub-operations complete with failures or warnings",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
}

Progress = Callable[["RetrieveResult"], None]
"""Called with the counts so far after every pending C-MOVE/C-GET response."""


@dataclass(frozen=True)
class QROptions:
    """Who the node is and how long it waits (ACSE, DIMSE, network, connection timeouts)."""

    calling_aet: str
    timeout: float = 60.0


@dataclass
class RetrieveResult:
    """Outcome of one C-MOVE or C-GET: the PACS's final status and sub-operation counts.

    ``status`` is None when no final response came (timeout, abort). For C-GET, ``stored`` and
    ``store_failures`` (SOPInstanceUID -> reason) say what the node itself did with each
    instance that arrived.
    """

    status: int | None = None
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_uids: tuple[str, ...] = ()
    comment: str = ""
    stored: int = 0
    store_failures: dict[str, str] = field(default_factory=dict)
    transfers: Transfers = field(default_factory=Transfers)
    """C-GET: what the node stored, per study (for the audit trail)."""

    @property
    def complete(self) -> bool:
        """Success with every sub-operation completed: the series may be used."""
        return (
            self.status == STATUS_SUCCESS
            and self.failed == 0
            and self.warning == 0
            and not self.store_failures
        )

    @property
    def total(self) -> int:
        """Sub-operations the PACS reported in its final answer."""
        return self.completed + self.failed + self.warning

    def describe(self) -> str:
        """The outcome in words (status, counts, why not complete)."""
        if self.status is None:
            head = "no final answer from the PACS (timeout or abort)"
        else:
            meaning = status_meaning(self.status)
            head = f"status 0x{self.status:04X}" + (f" ({meaning})" if meaning else "")
        text = f"{head}: {self.completed} completed, {self.failed} failed, {self.warning} warning"
        if self.comment:
            text += f"; PACS comment: {self.comment}"
        if self.store_failures:
            uid, why = next(iter(self.store_failures.items()))
            text += f"; {len(self.store_failures)} refused by the node, e.g. {uid}: {why}"
        return text


# --------------------------------------------------------------------------- associations
def _make_ae(options: QROptions) -> AE:
    ae = AE(ae_title=options.calling_aet)
    ae.acse_timeout = options.timeout
    ae.dimse_timeout = options.timeout
    ae.network_timeout = options.timeout
    ae.connection_timeout = options.timeout
    ae.maximum_pdu_size = MAX_PDU_SIZE
    return ae


class _Connected:
    """Whether TCP connected (pynetdicom reports a refused connection as an abort)."""

    def __init__(self) -> None:
        self.yes = False

    def on_open(self, _event: Any) -> None:
        self.yes = True


def _not_established(
    assoc: Association, peer: DestinationLike, what: str, connected: bool
) -> QueryRetrieveError:
    if not connected:
        reason = f"cannot connect to {peer.host}:{peer.port}"
    elif assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result = getattr(prim, "result", None)
        diag = getattr(prim, "diagnostic", None)
        kind = "permanent" if result == 0x01 else "transient"
        reason = f"association rejected ({kind}, reason {diag}): is the node's AE title known?"
    elif assoc.is_aborted:
        reason = "association aborted by the PACS"
    else:
        reason = "association not established (no answer)"
    return QueryRetrieveError(f"{what} {describe(peer)}: {reason}")


def _associate(
    ae: AE, peer: DestinationLike, what: str, handlers: list[Any] | None = None, **kwargs: Any
) -> Association:
    connected = _Connected()
    tls = getattr(peer, "tls", None)  # a configured destination's DICOM TLS settings (#12)
    ctx = destination_context(tls) if tls is not None else None
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, connected.on_open), *(handlers or [])],
        tls_args=(ctx, peer.host) if ctx is not None else None,
        **kwargs,
    )
    if not assoc.is_established:
        if ctx is not None and ctx.handshake_error and not connected.yes:
            raise QueryRetrieveError(f"{what} {describe(peer)}: TLS: {ctx.handshake_error}")
        raise _not_established(assoc, peer, what, connected.yes)
    return assoc


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _identifier(level: str, keys: Mapping[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


UNABLE_TO_PROCESS = range(0xC000, 0xD000)
"""0xCxxx "unable to process": Orthanc answers so for an unknown move destination, and for a
C-MOVE or C-GET in which a sub-operation failed."""


def status_meaning(code: int) -> str:
    """A C-FIND/C-MOVE/C-GET status in words ('' when not known)."""
    if code in UNABLE_TO_PROCESS:
        return "unable to process"
    return STATUS_MEANINGS.get(code, "")


def _status_text(status: Dataset, code: int) -> str:
    meaning = status_meaning(code)
    comment = _value_text(status.get("ErrorComment"))
    text = f"status 0x{code:04X}" + (f" ({meaning})" if meaning else "")
    return text + (f": {comment}" if comment else "")


# --------------------------------------------------------------------------- C-FIND
class QueryAssociation:
    """An open Study Root C-FIND association; use as a context manager."""

    def __init__(self, peer: DestinationLike, options: QROptions) -> None:
        """Associate with ``peer`` (raises :class:`QueryRetrieveError` when that fails)."""
        self.peer = peer
        self.calling_aet = options.calling_aet
        ae = _make_ae(options)
        ae.add_requested_context(FIND_MODEL, list(QR_TRANSFER_SYNTAXES))
        self._assoc = _associate(ae, peer, "C-FIND")
        self._msg_id = 0

    def __enter__(self) -> QueryAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the association."""
        if self._assoc.is_established:
            self._assoc.release()

    def find(self, level: str, keys: Mapping[str, str]) -> list[dict[str, str]]:
        """C-FIND at ``level`` (STUDY, SERIES, ...); every match as keyword -> text."""
        self._msg_id = self._msg_id % 65535 + 1
        query = _identifier(level, keys)
        matches: list[dict[str, str]] = []
        responses = self._assoc.send_c_find(query, FIND_MODEL, msg_id=self._msg_id)
        for status, identifier in responses:
            if not status:
                raise QueryRetrieveError(
                    f"C-FIND {describe(self.peer)}: no answer (timeout, or the PACS aborted: "
                    f"does it allow AE {self.calling_aet} to query?)"
                )
            code = int(status.Status)
            if code in STATUS_PENDING:
                if identifier is not None:
                    matches.append({k: _value_text(identifier.get(k)) for k in keys})
                continue
            if code == STATUS_SUCCESS:
                break
            raise QueryRetrieveError(f"C-FIND {describe(self.peer)}: {_status_text(status, code)}")
        log.debug("C-FIND %s at %s level: %d match(es)", describe(self.peer), level, len(matches))
        return matches


# --------------------------------------------------------------------------- C-MOVE / C-GET
def _series_identifier(study_uid: str, series_uid: str) -> Dataset:
    return _identifier("SERIES", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid})


_COUNTS = (
    ("remaining", "NumberOfRemainingSuboperations"),
    ("completed", "NumberOfCompletedSuboperations"),
    ("failed", "NumberOfFailedSuboperations"),
    ("warning", "NumberOfWarningSuboperations"),
)


def _update_counts(result: RetrieveResult, status: Dataset) -> None:
    """Take the sub-operation counts a response carries (absent ones keep their last value)."""
    for attr, keyword in _COUNTS:
        value = status.get(keyword)
        if value is None or value == "":
            continue
        try:
            setattr(result, attr, int(value))
        except (TypeError, ValueError):
            continue


def _collect(
    responses: Iterator[tuple[Dataset, Dataset | None]],
    result: RetrieveResult,
    progress: Progress | None,
) -> RetrieveResult:
    """Read C-MOVE/C-GET responses into ``result`` until the final one."""
    for status, identifier in responses:
        if not status:
            result.status = None
            return result
        code = int(status.Status)
        _update_counts(result, status)
        if code in STATUS_PENDING:
            if progress is not None:
                progress(result)
            continue
        result.status = code
        result.comment = _value_text(status.get("ErrorComment"))
        if identifier is not None:
            failed = identifier.get("FailedSOPInstanceUIDList")
            if failed:
                result.failed_sop_uids = tuple(_value_text(failed).split("\\"))
        return result
    return result


def move_series(
    peer: DestinationLike,
    *,
    study_uid: str,
    series_uid: str,
    destination_aet: str,
    options: QROptions,
    progress: Progress | None = None,
) -> RetrieveResult:
    """C-MOVE one series from ``peer`` to ``destination_aet`` (the node's own AE title)."""
    ae = _make_ae(options)
    ae.add_requested_context(MOVE_MODEL, list(QR_TRANSFER_SYNTAXES))
    assoc = _associate(ae, peer, "C-MOVE")
    try:
        responses = assoc.send_c_move(
            _series_identifier(study_uid, series_uid), destination_aet, MOVE_MODEL
        )
        result = _collect(responses, RetrieveResult(), progress)
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("C-MOVE of series %s from %s: %s", series_uid, describe(peer), result.describe())
    return result


class _GetReceiver:
    """The C-STORE handler of a C-GET association: the node's store path, nothing else."""

    def __init__(self, store: Store, peer: DestinationLike, result: RetrieveResult) -> None:
        self.store = store
        self.calling_aet = peer.ae_title
        self.peer = f"{peer.host}:{peer.port}"
        self.result = result

    def on_store(self, event: Any) -> int:
        uid = _value_text(getattr(event.request, "AffectedSOPInstanceUID", "")) or "?"
        try:
            encoded = event.encoded_dataset(include_meta=True)
            stored = self.store.store_encoded(encoded, calling_aet=self.calling_aet, peer=self.peer)
        except NodeError as exc:
            log.warning(
                "C-GET instance %s from %s refused with 0x%04X: %s", uid, self.peer, exc.status, exc
            )
            self.result.store_failures[uid] = str(exc)
            return exc.status
        except Exception as exc:
            log.exception("C-GET instance %s from %s: unexpected error", uid, self.peer)
            self.result.store_failures[uid] = f"{type(exc).__name__}: {exc}"
            return STATUS_PROCESSING_FAILURE
        self.result.stored += 1
        self.result.transfers.add(
            stored.study_instance_uid,
            stored.sop_class_uid,
            patient_id=stored.patient_id,
            issuer=stored.issuer_of_patient_id,
            duplicate=stored.duplicate,
        )
        return STATUS_SUCCESS


def get_series(
    peer: DestinationLike,
    *,
    study_uid: str,
    series_uid: str,
    store: Store,
    sop_classes: Sequence[str],
    options: QROptions,
    progress: Progress | None = None,
) -> RetrieveResult:
    """C-GET one series from ``peer``, storing each instance through ``store``.

    Only ``sop_classes`` get a storage context (with the SCP role): instances of any other
    class cannot be sent back and count as failed sub-operations at the PACS.
    """
    ae = _make_ae(options)
    ae.add_requested_context(GET_MODEL, list(QR_TRANSFER_SYNTAXES))
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, list(STORAGE_PREFERENCE))
    roles = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
    result = RetrieveResult()
    receiver = _GetReceiver(store, peer, result)
    assoc = _associate(ae, peer, "C-GET", [(evt.EVT_C_STORE, receiver.on_store)], ext_neg=roles)
    try:
        responses = assoc.send_c_get(_series_identifier(study_uid, series_uid), GET_MODEL)
        _collect(responses, result, progress)
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("C-GET of series %s from %s: %s", series_uid, describe(peer), result.describe())
    return result
