"""The console's pages: login, dashboard, jobs list and job detail (retry, cancel, preview).

The configuration pages are in :mod:`.configpages`. Every page needs a session (else the login
page answers, status 401); every form that changes something carries the CSRF token.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from dicom_node.console import actions, views
from dicom_node.console.changes import Action, Change, record_change
from dicom_node.console.guard import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    PageCaller,
    PageChange,
    check_password,
    client_of,
    context_of,
)
from dicom_node.console.render import render
from dicom_node.models import Job
from dicom_node.states import JobState

router = APIRouter(include_in_schema=False)

JOB_ACTION_NAMES = tuple(actions.JOB_ACTIONS)
QUALITY_LABELS = {
    "metric_value": "Mattes metric (lower is better)",
    "mask_dice": "Head mask overlap (Dice)",
    "iterations": "Iterations",
    "seconds": "Registration time (s)",
    "angle_from_header_deg": "Turn against the headers (degrees)",
}
"""Labels of the registration quality figures the job page knows; others show their key."""


def _safe_next(path: str | None) -> str:
    """Only a path on this site (no ``//host`` or scheme): no open redirect after login."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def login_page(
    request: Request, *, next_path: str = "/", error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    """The login form, with a fresh double-submit token in a cookie and in the form."""
    ctx = context_of(request)
    token = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        {
            "title": "Log in",
            "next": _safe_next(next_path),
            "login_token": token,
            "error": error,
            "no_password": not ctx.passwords.has_users(),
        },
        status_code=status_code,
    )
    secure = request.url.scheme == "https"
    response.set_cookie(
        LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=secure, path="/login"
    )
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    """The login form (or straight on when already logged in)."""
    if context_of(request).web_sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return login_page(request, next_path=next)


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    login_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    """Check the password (rate-limited, failures logged) and start a session."""
    ctx = context_of(request)
    client = client_of(request)
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie.encode(), login_token.encode()):
        return login_page(
            request, next_path=next, error="The form expired; please log in again.", status_code=403
        )
    user = username.strip() or "admin"
    if not check_password(ctx, client, user, password):
        return login_page(
            request, next_path=next, error="Wrong user name or password.", status_code=401
        )
    token, _session = ctx.web_sessions.create(user)
    record_change(Change(user, client, Action.LOGIN, "console"), ctx.config)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, caller: PageChange) -> Response:
    """End the session."""
    ctx = context_of(request)
    ctx.web_sessions.drop(request.cookies.get(SESSION_COOKIE))
    record_change(Change(caller.user, caller.client, Action.LOGOUT, "console"), ctx.config)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, caller: PageCaller) -> HTMLResponse:
    """What the node is doing: associations, series, jobs, disk, worker, recent errors."""
    ctx = context_of(request)
    with ctx.sessions() as session:
        data = views.dashboard(
            session, ctx.config, worker_alive=ctx.worker_alive, log_lines=ctx.recent.lines()
        )
    return render(request, "dashboard.html", {"title": "Dashboard", "d": data}, caller=caller)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, caller: PageCaller, state: str = "") -> HTMLResponse:
    """The newest jobs, optionally in one state."""
    ctx = context_of(request)
    wanted = JobState(state) if state in set(JobState) else None
    with ctx.sessions() as session:
        rows = views.list_jobs(session, state=wanted)
        counts = views.count_by(session, Job.state, JobState)
    context = {"title": "Jobs", "jobs": rows, "state": wanted, "states": list(JobState)}
    return render(request, "jobs.html", {**context, "counts": counts}, caller=caller)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, caller: PageCaller, job_id: int) -> HTMLResponse:
    """One job: pairing, stages, registration quality and warnings, preview, sends."""
    ctx = context_of(request)
    with ctx.sessions() as session:
        job = views.job_detail(session, ctx.config, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    context = {"title": f"Job {job_id}", "job": job, "quality_labels": QUALITY_LABELS}
    return render(request, "job.html", context, caller=caller)


@router.get("/jobs/{job_id}/preview.png")
def job_preview(request: Request, caller: PageCaller, job_id: int) -> FileResponse:
    """The job's preview picture (CT, registered MR, fused, checkerboard)."""
    path = views.preview_path(context_of(request).config, job_id)
    if not path.is_file():
        raise HTTPException(404, f"job {job_id} has no preview")
    return FileResponse(path, media_type="image/png")


@router.post("/jobs/{job_id}/{action}")
def job_action(request: Request, caller: PageChange, job_id: int, action: str) -> Response:
    """Retry or cancel a job, then back to its page with the answer."""
    if action not in JOB_ACTION_NAMES:
        raise HTTPException(404, f"no action {action!r}")
    try:
        result = actions.job_action(context_of(request), caller, job_id, action)
    except KeyError:
        raise HTTPException(404, f"no job {job_id}") from None
    assert caller.session is not None
    caller.session.flash("ok" if result.changed else "warning", result.message)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
