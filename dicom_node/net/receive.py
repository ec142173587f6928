"""How a received dataset gets from pynetdicom into the store, with bounded memory.

pynetdicom streams each received dataset into a file (``_config.STORE_RECV_CHUNKED_DATASET``)
made in the store's staging folder (:func:`route_received_files`): on the storage disk, so it
is renamed into place, never copied, and owner-only. :func:`store_from_event` hands that file
(or, where streaming is off, the bytes in memory) to :meth:`Store.store_received`, checked
against the request's presentation context; the C-STORE handlers of the Storage SCP and of
C-GET retrievals both use it. A transfer that ends abnormally leaves a partial file behind,
removed by :func:`sweep_staging` (and at start-up by the store).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import _config, dimse_messages

from dicom_node.storage.fsutil import unlink_quietly
from dicom_node.storage.store import Expected, Store, StoredInstance

log = logging.getLogger(__name__)

ERROR_COMMENT_LENGTH = 64
"""Error Comment is an LO value: at most 64 characters."""

_staging_dirs: list[Path] = []
_in_use: set[Path] = set()
_staging_lock = threading.Lock()


def failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status with its Error Comment."""
    rsp = Dataset()
    rsp.Status = status
    text = "".join(c if " " <= c <= "~" else "?" for c in comment)
    rsp.ErrorComment = text[:ERROR_COMMENT_LENGTH]
    return rsp


def store_from_event(store: Store, event: Any, *, calling_aet: str, peer: str) -> StoredInstance:
    """Store the dataset of a C-STORE event (a Storage SCP's, or a C-GET's sub-operation),
    checked against the event's presentation context: from the file pynetdicom streamed it
    into (``STORE_RECV_CHUNKED_DATASET``, as in ``serve``), else from memory. Raises a
    :class:`NodeError` (its DIMSE status) when refused."""
    try:
        path = event.dataset_path  # the file pynetdicom streamed the dataset into
    except AttributeError:
        path = None
    expected = _expected(event)
    if path is None:
        encoded = event.encoded_dataset(include_meta=True)
        return store.store_encoded(encoded, calling_aet=calling_aet, peer=peer, expected=expected)
    staged = Path(path)
    with _staging_lock:
        _in_use.add(staged)
    try:
        return store.store_received(staged, expected=expected, calling_aet=calling_aet, peer=peer)
    finally:
        unlink_quietly(staged)  # normally renamed into storage already
        with _staging_lock:
            _in_use.discard(staged)


def sweep_staging(staging: Path, idle_seconds: float) -> int:
    """Remove received files no transfer writes to any more: pynetdicom leaves the file of a
    dataset behind when an association ends abnormally mid-transfer. A transfer in progress
    writes at least every ``idle_seconds`` (``node.network_timeout_seconds``, else it is
    aborted); files being stored are skipped. Returns the number removed."""
    cutoff = time.time() - idle_seconds
    removed = 0
    for path in staging.glob("tmp*.dcm"):
        with _staging_lock:
            busy = path in _in_use
        try:
            stale = not busy and path.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if stale:
            unlink_quietly(path)
            removed += 1
    if removed:
        log.warning(
            "removed %d partial transfer(s) left in %s by aborted associations", removed, staging
        )
    return removed


def _received_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's temporary file for a received dataset, made in the staging folder of the
    listener started last in this process (owner-only, as mkstemp makes it)."""
    with _staging_lock:
        folder = _staging_dirs[-1] if _staging_dirs else None
    if folder is not None:
        kwargs.setdefault("dir", folder)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def route_received_files(staging: Path) -> None:
    """Have pynetdicom stream received datasets to files in ``staging`` (on the storage
    disk, so they are renamed into place, never copied; a crash leaves them to the store's
    start-up sweep). pynetdicom makes these files with ``tempfile.NamedTemporaryFile`` in the
    system's temporary folder; its module's name for that function is pointed here (a test
    checks the files really land in ``staging``)."""
    with _staging_lock:
        _staging_dirs.append(staging)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _received_file  # type: ignore[attr-defined]


def unroute_received_files(staging: Path) -> None:
    """Undo :func:`route_received_files` for ``staging`` (a listener stopped)."""
    with _staging_lock:
        if staging in _staging_dirs:
            _staging_dirs.remove(staging)


def _expected(event: Any) -> Expected:
    context = event.context
    request = event.request
    return Expected(
        sop_class_uid=str(context.abstract_syntax),
        transfer_syntax_uid=str(context.transfer_syntax),
        request_sop_class_uid=str(request.AffectedSOPClassUID or ""),
    )


def bytes_arriving(assoc: Any) -> int | None:
    """Bytes of the dataset ``assoc`` is receiving now (None when it receives none)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    try:
        return None if handle is None else os.fstat(handle.fileno()).st_size
    except (OSError, ValueError):
        return None


def discard_partial_dataset(assoc: Any) -> None:
    """Remove the staged file of a dataset whose transfer never completed (aborted)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if handle is not None:
        handle.close()
    if path is not None:
        unlink_quietly(Path(path))
