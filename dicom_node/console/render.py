"""HTML pages: the Jinja2 templates in ``pages/`` (autoescaped), their filters and common data.

Page titles name the page and, for a job, its number: never a patient's name or ID.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

if TYPE_CHECKING:
    from dicom_node.console.guard import Caller

PAGES_DIR = Path(__file__).resolve().parent / "pages"
STATIC_DIR = Path(__file__).resolve().parent / "static"


def local_time(when: datetime | None) -> str:
    """A UTC time as the node's local time, to the second ('-' for none)."""
    if when is None:
        return "-"
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return aware.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    """Seconds as ``4.2 s``, ``3 min 05 s`` or ``2 h 03 min``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size(n: float | None) -> str:
    """Bytes in binary units (``12.3 GiB``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns


def short_uid(uid: str | None, keep: int = 16) -> str:
    """The end of a long UID (the distinctive part), whole when short."""
    if not uid:
        return "-"
    return uid if len(uid) <= keep + 3 else "…" + uid[-keep:]


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(PAGES_DIR))
    env = templates.env
    env.filters["when"] = local_time
    env.filters["duration"] = duration
    env.filters["size"] = size
    env.filters["short_uid"] = short_uid
    env.trim_blocks = True
    env.lstrip_blocks = True
    return templates


TEMPLATES = _templates()


def render(
    request: Request,
    name: str,
    context: Mapping[str, Any] | None = None,
    *,
    caller: Caller | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """Render page ``name`` with the signed-in user, CSRF token, messages and node identity."""
    ctx = request.app.state.ctx
    session = caller.session if caller is not None else None
    common: dict[str, Any] = {
        "user": caller.user if caller is not None else None,
        "csrf": session.csrf if session is not None else "",
        "flashes": session.take_flashes() if session is not None else [],
        "node_ae": ctx.config.node.ae_title,
        "path": request.url.path,
    }
    return TEMPLATES.TemplateResponse(
        request, name, {**common, **(context or {})}, status_code=status_code
    )
