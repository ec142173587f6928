"""What an admin can do, shared by the pages and the REST API, each change recorded once.

Job retry and cancel are the transitions of :mod:`dicom_node.orchestration.jobs`; configuration
saves go through :class:`~dicom_node.console.configedit.ConfigFile`; an echo is
:func:`dicom_node.net.scu.echo` with the node's own AE title as caller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dicom_node.console.changes import Action, Change, record_change
from dicom_node.console.configedit import SaveResult
from dicom_node.console.guard import Caller
from dicom_node.console.schemas import ActionResult, EchoResult
from dicom_node.errors import NodeError
from dicom_node.models import Job
from dicom_node.orchestration import jobs
from dicom_node.states import JobState

if TYPE_CHECKING:
    from dicom_node.console.context import ConsoleContext

JOB_ACTIONS = {
    "retry": (jobs.retry_job, Action.JOB_RETRIED),
    "cancel": (jobs.cancel_job, Action.JOB_CANCELLED),
}


def _state(ctx: ConsoleContext, job_id: int) -> JobState:
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise KeyError(job_id)
        return job.state


def job_action(ctx: ConsoleContext, caller: Caller, job_id: int, name: str) -> ActionResult:
    """Retry or cancel a job (``KeyError`` when there is no such job)."""
    function, action = JOB_ACTIONS[name]
    before = _state(ctx, job_id)
    message = function(ctx.sessions, job_id)
    after = _state(ctx, job_id)
    changed = after != before or (name == "retry" and message.endswith("queued again"))
    if changed:
        change = Change(caller.user, caller.client, action, f"job {job_id}", message, job_id)
        record_change(change, ctx.config)
    return ActionResult(job=job_id, changed=changed, state=after, message=message)


def echo_destination(ctx: ConsoleContext, caller: Caller, name: str) -> EchoResult:
    """C-ECHO a configured destination (``KeyError`` when it is not configured)."""
    from dicom_node.net.scu import describe, echo

    config = ctx.config
    dest = config.destinations[name]
    t0 = time.monotonic()
    try:
        echo(dest, calling_aet=config.node.ae_title, timeout=ctx.echo_timeout)
        ok, message = True, f"C-ECHO {config.node.ae_title} -> {describe(dest)}: success"
    except NodeError as exc:
        ok, message = False, str(exc)
    seconds = round(time.monotonic() - t0, 3)
    outcome = "success" if ok else f"failed: {message}"
    change = Change(caller.user, caller.client, Action.ECHO, f"destination {name}", outcome)
    record_change(change, config)
    return EchoResult(destination=name, ok=ok, message=message, seconds=seconds)


def save_config(
    ctx: ConsoleContext,
    caller: Caller,
    data: Mapping[str, Any],
    *,
    expected_version: str | None = None,
) -> SaveResult:
    """Validate, save and apply a configuration (see :meth:`ConfigFile.save`); log the diff."""
    result = ctx.config_file.save(data, expected_version=expected_version)
    if result.changed:
        detail = "; ".join(result.diff) or "formatting only"
        if not result.applied:
            detail += " (saved, NOT applied yet)"
        target = str(ctx.config_file.path)
        keys = tuple(line.split(" ", 1)[0].rstrip(":") for line in result.diff)
        change = Change(
            caller.user, caller.client, Action.CONFIG_CHANGED, target, detail, keys=keys
        )
        record_change(change, ctx.config)
    return result
