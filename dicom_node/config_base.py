"""Building blocks of the configuration models: the section base class and shared field types.

They live apart from :mod:`dicom_node.config` so that groups of sections can be defined in
their own modules (:mod:`dicom_node.config_security`) and still be part of one
:class:`~dicom_node.config.NodeConfig` without an import cycle. Nothing here reads files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
"""A DICOM AE title: 1-16 printable ASCII characters without backslash."""


def check_ae_title(value: str) -> str:
    """Validate a DICOM AE title (1-16 printable ASCII characters, no backslash)."""
    stripped = value.strip()
    if not stripped or not AE_TITLE_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)"
        )
    return stripped


AETitle = Annotated[str, StringConstraints(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=1, le=65535)]


M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_path(path: Path, base: Path) -> Path:
    """``path`` made absolute against ``base`` (``~`` expanded, ``..`` folded)."""
    path = path.expanduser()
    if not path.is_absolute():
        path = base / path
    return Path(os.path.normpath(path))


def resolve_paths_in(model: M, base: Path) -> M:
    """A copy of ``model`` with every :class:`Path` field (in nested sections, lists and dicts
    of sections too) resolved against ``base``: relative paths in a config file mean "relative
    to the file's folder", not to the working directory of whoever starts the node."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        resolved = _resolved_value(value, base)
        if resolved is not value:
            updates[name] = resolved
    return model.model_copy(update=updates) if updates else model


def _resolved_value(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return resolve_path(value, base)
    if isinstance(value, BaseModel):
        return resolve_paths_in(value, base)
    if isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
        return {k: _resolved_value(v, base) for k, v in value.items()}
    return value
