"""The console's HTTP application: what it knows about the node, its routes, its defences.

:func:`create_app` builds a FastAPI application on a :class:`ConsoleContext` (the node's config
file and watcher, its index, its worker). Every response carries a strict Content-Security-
Policy (scripts and styles only from ``/static``, which the package ships: nothing comes from a
CDN, the console works offline) and is not cached, except the static files. The OpenAPI schema
is served at ``/api/openapi.json``; there is no Swagger UI (it would load scripts from a CDN).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node.console import api, configpages, health, prometheus, web
from dicom_node.console.context import ConsoleContext
from dicom_node.console.guard import (
    REALM,
    ForbiddenError,
    NotAuthenticatedError,
    TooManyAttemptsError,
)
from dicom_node.console.render import STATIC_DIR, render

log = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    if not request.url.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def _wants_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def _not_authenticated(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotAuthenticatedError)
    if exc.api or _wants_api(request):
        return JSONResponse(
            {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": REALM}
        )
    if request.method != "GET":
        return RedirectResponse("/login", status_code=303)
    return web.login_page(request, next_path=request.url.path, status_code=401)


async def _forbidden(request: Request, exc: Exception) -> Response:
    if _wants_api(request):
        return JSONResponse({"detail": str(exc)}, status_code=403)
    return render(request, "error.html", {"title": "Refused", "message": str(exc)}, status_code=403)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if _wants_api(request):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
    message = str(exc.detail)
    context = {"title": f"Error {exc.status_code}", "message": message}
    return render(request, "error.html", context, status_code=exc.status_code)


async def _too_many(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TooManyAttemptsError)
    headers = {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))}
    if _wants_api(request):
        return JSONResponse({"detail": str(exc)}, status_code=429, headers=headers)
    response = web.login_page(request, error=str(exc), status_code=429)
    response.headers.update(headers)
    return response


def create_app(ctx: ConsoleContext) -> FastAPI:
    """The console application on ``ctx``."""
    app = FastAPI(
        title="dicom-node admin console",
        summary="Configuration (AE titles, destinations, routing), jobs, metrics and health "
        "of the MR-CT fusion node",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=f"{api.PREFIX}/openapi.json",
    )
    app.state.ctx = ctx
    app.state.metrics_registry = prometheus.registry_for(
        ctx.sessions, lambda: ctx.config, ctx.worker_alive
    )
    app.middleware("http")(_security_headers)
    app.add_exception_handler(NotAuthenticatedError, _not_authenticated)
    app.add_exception_handler(ForbiddenError, _forbidden)
    app.add_exception_handler(TooManyAttemptsError, _too_many)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in (health.router, prometheus.router, api.router, web.router, configpages.router):
        app.include_router(router)
    return app
