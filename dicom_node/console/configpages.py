"""Configuration pages: the node's AE title and allowed callers, destinations, routing, echo.

Each form is drawn from the section's pydantic model (:mod:`.forms`) with the values the YAML
file holds; a submission becomes the whole file's data with that section replaced, and goes
through the same validation, atomic save and live reload as ``PUT /api/config``. Errors are
shown next to their field; nothing is written unless everything is valid. Every form carries
the file's version: a save over a file that changed meanwhile is refused, not merged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel

from dicom_node.config import Destination, NodeSection, RoutingSection
from dicom_node.console import actions
from dicom_node.console.auth import Session
from dicom_node.console.configedit import ConfigConflictError, ConfigInvalidError, SaveResult
from dicom_node.console.forms import attach_errors, build_form, merge_section, parse_form
from dicom_node.console.guard import Caller, PageCaller, PageChange, context_of
from dicom_node.console.render import render

router = APIRouter(include_in_schema=False)

VERSION_FIELD = "version"
NAME_FIELD = "destination_name"

NODE_HELP = {
    "ae_title": "This node's AE title: what senders put as called AE (1-16 characters).",
    "host": "Address to listen on (0.0.0.0: every interface). Needs a restart.",
    "port": "DICOM port to listen on. Needs a restart.",
    "allowed_calling_aets": "Calling AE titles allowed to send. Empty: anyone may send.",
    "max_associations": "Most associations at the same time; more are rejected.",
    "network_timeout_seconds": "Seconds of silence before an association is dropped.",
    "shutdown_timeout_seconds": "On stop: seconds to let associations finish.",
}
DESTINATION_HELP = {
    "ae_title": "The peer's own (called) AE title.",
    "host": "Its host name or IP address.",
    "port": "Its DICOM port (1-65535).",
    "send": "Which derived objects it receives.",
}


def _flash_saved(session: Session, result: SaveResult) -> None:
    if not result.changed:
        session.flash("info", "Nothing changed.")
        return
    changes = "; ".join(result.diff)
    if result.applied:
        session.flash("ok", f"Saved and applied: {changes}")
    else:
        session.flash("error", f"Saved but not applied yet (see the node's log): {changes}")
    if result.restart_keys:
        keys = ", ".join(result.restart_keys)
        session.flash("warning", f"{keys} take effect after a restart of dicom-node serve.")


async def _save(
    request: Request, caller: Caller, data: Mapping[str, Any]
) -> tuple[SaveResult | None, dict[str, str]]:
    """Save the whole configuration: the result, or the errors by key (nothing written)."""
    ctx = context_of(request)
    form = await request.form()
    version = form.get(VERSION_FIELD)
    try:
        result = await run_in_threadpool(
            actions.save_config,
            ctx,
            caller,
            data,
            expected_version=version if isinstance(version, str) and version else None,
        )
    except ConfigInvalidError as exc:
        return None, {e.key: e.message for e in exc.errors}
    except ConfigConflictError as exc:
        return None, {"": str(exc)}
    assert caller.session is not None
    _flash_saved(caller.session, result)
    return result, {}


def _section_page(
    request: Request,
    caller: Caller,
    *,
    model: type[BaseModel],
    values: Mapping[str, Any] | None,
    errors: Mapping[str, str],
    prefix: str,
    extra: Mapping[str, Any],
) -> HTMLResponse:
    """A section's form with each error next to its field (422 when there are errors)."""
    ctx = context_of(request)
    help_texts = NODE_HELP if model is NodeSection else DESTINATION_HELP
    fields = build_form(model, values, help_texts=help_texts)
    placed = attach_errors(fields, errors, prefix)
    context = {
        "fields": fields,
        "other_errors": {k: v for k, v in errors.items() if k not in placed},
        "version": ctx.config_file.version(),
        "config_path": str(ctx.config_file.path),
        "overrides": ctx.config_file.overrides,
        **extra,
    }
    status = 422 if errors else 200
    return render(request, "section_form.html", context, caller=caller, status_code=status)


# --------------------------------------------------------------------------- overview
@router.get("/config", response_class=HTMLResponse)
def config_page(request: Request, caller: PageCaller) -> HTMLResponse:
    """The node's identity, allowed callers, destinations (with Echo) and routing."""
    ctx = context_of(request)
    raw = ctx.config_file.read_raw()
    context = {
        "title": "Configuration",
        "cfg": ctx.config,
        "raw": raw,
        "version": ctx.config_file.version(),
        "config_path": str(ctx.config_file.path),
        "overrides": ctx.config_file.overrides,
    }
    return render(request, "config.html", context, caller=caller)


# --------------------------------------------------------------------------- node
def _node_page(
    request: Request, caller: Caller, values: Mapping[str, Any] | None, errors: Mapping[str, str]
) -> HTMLResponse:
    extra = {"title": "Node and allowed calling AEs", "action": "/config/node", "is_new": False}
    return _section_page(
        request,
        caller,
        model=NodeSection,
        values=values,
        errors=errors,
        prefix="node.",
        extra=extra,
    )


@router.get("/config/node", response_class=HTMLResponse)
def node_form(request: Request, caller: PageCaller) -> HTMLResponse:
    """The ``node`` section: AE title, address, allowed calling AE titles, limits."""
    raw = context_of(request).config_file.read_raw()
    return _node_page(request, caller, raw.get("node"), {})


@router.post("/config/node")
async def node_save(request: Request, caller: PageChange) -> Response:
    """Save the ``node`` section."""
    ctx = context_of(request)
    form = await request.form()
    submitted, errors = parse_form(NodeSection, lambda k: [str(v) for v in form.getlist(k)])
    if not errors:
        raw = ctx.config_file.read_raw()
        data = copy.deepcopy(raw)
        data["node"] = merge_section(NodeSection, raw.get("node"), submitted)
        result, errors = await _save(request, caller, data)
        if result is not None:
            return RedirectResponse("/config", status_code=303)
    return _node_page(request, caller, submitted, errors)


# --------------------------------------------------------------------------- destinations
def _destination_page(
    request: Request,
    caller: Caller,
    name: str,
    values: Mapping[str, Any] | None,
    errors: Mapping[str, str],
    *,
    is_new: bool,
) -> HTMLResponse:
    errors = dict(errors)
    name_error = errors.pop("destinations", None) or errors.pop(f"destinations.{name}", None)
    extra = {
        "title": "New destination" if is_new else f"Destination {name}",
        "action": "/config/destinations/new" if is_new else f"/config/destinations/{name}",
        "is_new": is_new,
        "name": name,
        "name_field": NAME_FIELD,
        "name_error": name_error,
    }
    return _section_page(
        request,
        caller,
        model=Destination,
        values=values,
        errors=errors,
        prefix=f"destinations.{name}.",
        extra=extra,
    )


def _destinations(raw: Mapping[str, Any]) -> dict[str, Any]:
    dests = raw.get("destinations")
    return dict(dests) if isinstance(dests, Mapping) else {}


@router.get("/config/destinations/new", response_class=HTMLResponse)
def destination_new(request: Request, caller: PageCaller) -> HTMLResponse:
    """An empty destination form."""
    return _destination_page(request, caller, "", {}, {}, is_new=True)


@router.get("/config/destinations/{name}", response_class=HTMLResponse)
def destination_form(request: Request, caller: PageCaller, name: str) -> HTMLResponse:
    """One destination's form."""
    dests = _destinations(context_of(request).config_file.read_raw())
    if name not in dests:
        raise HTTPException(404, f"no destination {name!r}")
    return _destination_page(request, caller, name, dests[name], {}, is_new=False)


async def _save_destination(request: Request, caller: Caller, name: str, is_new: bool) -> Response:
    ctx = context_of(request)
    form = await request.form()
    if is_new:
        name = str(form.get(NAME_FIELD) or "").strip()
    submitted, errors = parse_form(Destination, lambda k: [str(v) for v in form.getlist(k)])
    raw = ctx.config_file.read_raw()
    dests = _destinations(raw)
    if is_new and not name:
        errors["destinations"] = "a destination needs a name"
    elif is_new and name in dests:
        errors["destinations"] = f"a destination named {name!r} exists already"
    if not errors:
        data = copy.deepcopy(raw)
        dests[name] = merge_section(Destination, dests.get(name), submitted)
        data["destinations"] = dests
        result, errors = await _save(request, caller, data)
        if result is not None:
            return RedirectResponse("/config", status_code=303)
    return _destination_page(request, caller, name, submitted, errors, is_new=is_new)


@router.post("/config/destinations/new")
async def destination_create(request: Request, caller: PageChange) -> Response:
    """Add a destination."""
    return await _save_destination(request, caller, "", is_new=True)


@router.post("/config/destinations/{name}")
async def destination_save(request: Request, caller: PageChange, name: str) -> Response:
    """Save a destination."""
    if name not in _destinations(context_of(request).config_file.read_raw()):
        raise HTTPException(404, f"no destination {name!r}")
    return await _save_destination(request, caller, name, is_new=False)


@router.post("/config/destinations/{name}/delete")
async def destination_delete(request: Request, caller: PageChange, name: str) -> Response:
    """Remove a destination (and its name from routing)."""
    raw = context_of(request).config_file.read_raw()
    dests = _destinations(raw)
    if name not in dests:
        raise HTTPException(404, f"no destination {name!r}")
    data = copy.deepcopy(raw)
    del dests[name]
    data["destinations"] = dests
    routing = data.get("routing")
    if isinstance(routing, dict) and isinstance(routing.get("send_to"), list):
        routing["send_to"] = [n for n in routing["send_to"] if n != name]
    _result, errors = await _save(request, caller, data)
    assert caller.session is not None
    for key, message in errors.items():
        caller.session.flash("error", f"{key}: {message}" if key else message)
    return RedirectResponse("/config", status_code=303)


@router.post("/config/destinations/{name}/echo")
async def destination_echo(request: Request, caller: PageChange, name: str) -> Response:
    """C-ECHO a destination; the answer shows on the configuration page."""
    ctx = context_of(request)
    if name not in ctx.config.destinations:
        raise HTTPException(404, f"no destination {name!r} in force")
    result = await run_in_threadpool(actions.echo_destination, ctx, caller, name)
    assert caller.session is not None
    caller.session.flash("ok" if result.ok else "error", f"{name}: {result.message}")
    return RedirectResponse(f"/config#dest-{name}", status_code=303)


# --------------------------------------------------------------------------- routing
@router.post("/config/routing")
async def routing_save(request: Request, caller: PageChange) -> Response:
    """Choose the destinations every job's results go to."""
    ctx = context_of(request)
    form = await request.form()
    submitted, _ = parse_form(RoutingSection, lambda k: [str(v) for v in form.getlist(k)])
    raw = ctx.config_file.read_raw()
    data = copy.deepcopy(raw)
    current = raw.get("routing")
    data["routing"] = merge_section(
        RoutingSection, current if isinstance(current, Mapping) else None, submitted
    )
    _result, errors = await _save(request, caller, data)
    assert caller.session is not None
    for key, message in errors.items():
        caller.session.flash("error", f"{key}: {message}" if key else message)
    return RedirectResponse("/config#routing", status_code=303)
