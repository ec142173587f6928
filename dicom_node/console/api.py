"""The REST API (JSON) under ``/api``: everything the pages do, for scripts and other tools.

Authentication: HTTP Basic (``curl -u admin ...``) or the page session (see :mod:`.guard`).

- ``GET /api/config``: the configuration as the YAML file holds it (paths as written, not
  resolved; an ``ETag`` header carries the file's version); ``PUT /api/config`` takes the whole
  configuration: 200 when saved and applied, 422 naming each failing key (nothing changes),
  409 when ``If-Match`` names another version; ``GET /api/config/effective``: the
  configuration in force, defaults filled in and paths resolved;
- ``GET /api/status``: the dashboard's figures;
- ``GET /api/jobs``, ``GET /api/jobs/{id}``, ``GET /api/jobs/{id}/preview.png``,
  ``POST /api/jobs/{id}/retry``, ``POST /api/jobs/{id}/cancel`` (409 when the job's state does
  not allow it);
- ``POST /api/destinations/{name}/echo``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from dicom_node.console import actions, views
from dicom_node.console.configedit import ConfigConflictError, ConfigInvalidError
from dicom_node.console.guard import ApiCaller, context_of
from dicom_node.console.schemas import (
    ActionResult,
    ConfigSaved,
    Dashboard,
    EchoResult,
    FieldErrorView,
    JobDetail,
    JobSummary,
    Problem,
)
from dicom_node.states import JobState

PREFIX = "/api"
MAX_LIMIT = 1000

router = APIRouter(prefix=PREFIX, tags=["api"])


def _problem(status: int, detail: str, errors: list[FieldErrorView] | None = None) -> JSONResponse:
    body = Problem(detail=detail, errors=errors or [])
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


@router.get("/config", response_model=dict[str, Any])
def get_config(request: Request, caller: ApiCaller) -> JSONResponse:
    """The configuration exactly as the YAML file holds it (``{}`` when there is no file)."""
    ctx = context_of(request)
    version = ctx.config_file.version()
    return JSONResponse(ctx.config_file.read_raw(), headers={"ETag": f'"{version}"'})


@router.get("/config/effective", response_model=dict[str, Any])
def get_effective_config(request: Request, caller: ApiCaller) -> dict[str, Any]:
    """The configuration in force: defaults filled in, paths resolved, overrides applied."""
    return context_of(request).config.model_dump(mode="json")


@router.put(
    "/config",
    response_model=ConfigSaved,
    responses={409: {"model": Problem}, 422: {"model": Problem}},
)
async def put_config(
    request: Request,
    caller: ApiCaller,
    data: Annotated[dict[str, Any], Body()],
    if_match: Annotated[str | None, Header()] = None,
) -> Any:
    """Replace the whole configuration: validated, saved atomically (comments kept), applied."""
    ctx = context_of(request)
    expected = if_match.strip().strip('"') if if_match else None
    try:
        result = await run_in_threadpool(
            actions.save_config, ctx, caller, data, expected_version=expected
        )
    except ConfigInvalidError as exc:
        errors = [FieldErrorView(key=e.key, message=e.message) for e in exc.errors]
        return _problem(422, "invalid configuration: nothing was changed", errors)
    except ConfigConflictError as exc:
        return _problem(409, str(exc))
    body = ConfigSaved(
        changed=result.changed,
        applied=result.applied,
        version=result.version,
        diff=result.diff,
        restart_keys=result.restart_keys,
    )
    status = 200 if result.applied else 202
    return JSONResponse(
        body.model_dump(mode="json"), status_code=status, headers={"ETag": f'"{result.version}"'}
    )


@router.get("/status", response_model=Dashboard)
def get_status(request: Request, caller: ApiCaller) -> Dashboard:
    """The dashboard's figures."""
    ctx = context_of(request)
    with ctx.sessions() as session:
        return views.dashboard(
            session, ctx.config, worker_alive=ctx.worker_alive, log_lines=ctx.recent.lines()
        )


@router.get("/jobs", response_model=list[JobSummary])
def get_jobs(
    request: Request,
    caller: ApiCaller,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = views.DEFAULT_JOB_LIMIT,
) -> list[JobSummary]:
    """The newest jobs, newest first (optionally only those in ``state``)."""
    with context_of(request).sessions() as session:
        return views.list_jobs(session, state=state, limit=limit)


@router.get("/jobs/{job_id}", response_model=JobDetail, responses={404: {"model": Problem}})
def get_job(request: Request, caller: ApiCaller, job_id: int) -> Any:
    """One job with its stages, sends, registration quality and warnings."""
    ctx = context_of(request)
    with ctx.sessions() as session:
        job = views.job_detail(session, ctx.config, job_id)
    if job is None:
        return _problem(404, f"no job {job_id}")
    return job


@router.get(
    "/jobs/{job_id}/preview.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, 404: {"model": Problem}},
)
def get_job_preview(request: Request, caller: ApiCaller, job_id: int) -> Any:
    """The job's preview picture: CT, registered MR, fused and checkerboard in three planes."""
    path = views.preview_path(context_of(request).config, job_id)
    if not path.is_file():
        return _problem(404, f"job {job_id} has no preview")
    return FileResponse(path, media_type="image/png")


def _job_action(request: Request, caller: ApiCaller, job_id: int, name: str) -> Any:
    try:
        result = actions.job_action(context_of(request), caller, job_id, name)
    except KeyError:
        return _problem(404, f"no job {job_id}")
    if not result.changed:
        return _problem(409, result.message)
    return result


@router.post(
    "/jobs/{job_id}/retry",
    response_model=ActionResult,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
def retry_job(request: Request, caller: ApiCaller, job_id: int) -> Any:
    """Queue a failed, cancelled or done job again (derived files and acknowledged sends kept)."""
    return _job_action(request, caller, job_id, "retry")


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=ActionResult,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
def cancel_job(request: Request, caller: ApiCaller, job_id: int) -> Any:
    """Cancel a job that is not finished."""
    return _job_action(request, caller, job_id, "cancel")


@router.post(
    "/destinations/{name}/echo", response_model=EchoResult, responses={404: {"model": Problem}}
)
def echo_destination(request: Request, caller: ApiCaller, name: str) -> Any:
    """C-ECHO a configured destination with the node's AE title as caller."""
    ctx = context_of(request)
    if name not in ctx.config.destinations:
        return _problem(404, f"no destination {name!r} in force")
    return actions.echo_destination(ctx, caller, name)
