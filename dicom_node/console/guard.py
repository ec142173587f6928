"""Who is asking: HTTP Basic for the API, a session cookie for pages, CSRF and origin checks.

- API (``/api/...``): HTTP Basic on every request, or the page session's cookie; a change
  (POST, PUT, PATCH, DELETE) through the cookie must carry the session's CSRF token in the
  ``X-CSRF-Token`` header. No credentials: 401 with ``WWW-Authenticate: Basic``.
- Pages: the session cookie (HttpOnly, SameSite=Strict); every form that changes something
  carries the session's CSRF token; the login form its own double-submit token.
- Any change whose ``Origin`` is another site (or ``Sec-Fetch-Site: cross-site``) is refused,
  so a browser that cached Basic credentials cannot be made to act from another page.
- Failed logins (form or Basic) are rate-limited per address and per user, and logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, cast
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from dicom_node.console.auth import FAILURE_WINDOW_SECONDS, Session
from dicom_node.console.changes import Action, Change, record_change

if TYPE_CHECKING:
    from dicom_node.console.context import ConsoleContext

SESSION_COOKIE = "dicom_node_session"
LOGIN_COOKIE = "dicom_node_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REALM = 'Basic realm="dicom-node", charset="UTF-8"'


class NotAuthenticatedError(Exception):
    """No valid credentials: 401 (the login page for pages, JSON for the API)."""

    def __init__(self, message: str = "authentication required", *, api: bool) -> None:
        super().__init__(message)
        self.api = api


class ForbiddenError(Exception):
    """A change without its CSRF token, or from another site: 403."""


class TooManyAttemptsError(Exception):
    """Too many failed logins from this address or for this user: 429 with Retry-After."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Caller:
    """An authenticated user, the client address, and the page session if there is one."""

    user: str
    client: str
    session: Session | None = None


def context_of(request: Request) -> ConsoleContext:
    """The console's context (set by :func:`dicom_node.console.app.create_app`)."""
    return cast("ConsoleContext", request.app.state.ctx)


def client_of(request: Request) -> str:
    """The client's address (as uvicorn saw it; a local reverse proxy's X-Forwarded-For)."""
    return request.client.host if request.client else "unknown"


def check_password(ctx: ConsoleContext, client: str, user: str, password: str) -> bool:
    """Verify a login, within the rate limit; every failure is logged with its address."""
    wait = ctx.limiter.retry_after(client, user)
    if wait > 0:
        change = Change(user, client, Action.LOGIN_FAILED, "console", "rate limited")
        record_change(change, ctx.config)
        raise TooManyAttemptsError(wait)
    if not ctx.passwords.verify(user, password):
        n = ctx.limiter.failed(client, user)
        detail = (
            f"wrong user name or password ({n} from this address within "
            f"{FAILURE_WINDOW_SECONDS / 60:.0f} min)"
        )
        record_change(Change(user, client, Action.LOGIN_FAILED, "console", detail), ctx.config)
        return False
    ctx.limiter.succeeded(client)
    return True


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _tokens_match(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


_basic = HTTPBasic(auto_error=False, realm="dicom-node")


def api_caller(
    request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
) -> Caller:
    """The API's caller: HTTP Basic, or the page session (with its CSRF header for changes)."""
    ctx = context_of(request)
    client = client_of(request)
    unsafe = request.method in UNSAFE_METHODS
    if unsafe and not same_origin(request):
        raise ForbiddenError("cross-site request refused")
    if credentials is not None:
        user, password = credentials.username, credentials.password
        version = ctx.passwords.version()
        if ctx.basic_cache.known(user, password, version):
            return Caller(user, client)
        if check_password(ctx, client, user, password):
            ctx.basic_cache.remember(user, password, version)
            return Caller(user, client)
        raise NotAuthenticatedError("wrong user name or password", api=True)
    session = ctx.web_sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise NotAuthenticatedError(api=True)
    if unsafe and not _tokens_match(request.headers.get(CSRF_HEADER), session.csrf):
        raise ForbiddenError(f"missing or wrong {CSRF_HEADER} header")
    return Caller(session.user, client, session)


def page_caller(request: Request) -> Caller:
    """A page's caller: a live session, else the login page (401)."""
    ctx = context_of(request)
    session = ctx.web_sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise NotAuthenticatedError(api=False)
    return Caller(session.user, client_of(request), session)


async def page_change(request: Request) -> Caller:
    """A form that changes something: a live session, same origin and its CSRF token."""
    caller = page_caller(request)
    if not same_origin(request):
        raise ForbiddenError("cross-site request refused")
    form = await request.form()
    assert caller.session is not None
    if not _tokens_match(form.get(CSRF_FIELD), caller.session.csrf):
        raise ForbiddenError("the form's security token is missing or out of date; reload it")
    return caller


ApiCaller = Annotated[Caller, Depends(api_caller)]
PageCaller = Annotated[Caller, Depends(page_caller)]
PageChange = Annotated[Caller, Depends(page_change)]
