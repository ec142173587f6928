"""Edits of the node's YAML file from the console: validated, atomic, comments kept, applied.

An edit is the whole configuration as the file holds it (paths as written, not resolved), so
``GET /api/config`` followed by ``PUT`` of the same data changes nothing. Before anything is
written the data is validated by the same pydantic model as the file (:class:`NodeConfig`);
an invalid edit changes nothing and reports each failing key. A valid edit is merged into the
file's YAML document with ruamel.yaml (comments, key order and quoting of untouched values
stay), checked to read back as exactly the data asked for (else the file is written plainly,
without comments, rather than wrongly), written atomically, and handed to the running node's
:class:`ConfigWatcher` at once, the same live reload an edit over SSH gets.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError as RuamelError

from dicom_node.config import NodeConfig, parse_config, read_config_file
from dicom_node.config_watcher import ConfigWatcher, restart_needed
from dicom_node.console.changes import config_diff
from dicom_node.errors import ConfigError
from dicom_node.storage.fsutil import FILE_MODE, write_text_durably

log = logging.getLogger(__name__)

APPLY_TIMEOUT_SECONDS = 5.0
"""How long a save waits for the running node to take the new configuration."""
ABSENT = "absent"
"""The version of a configuration file that does not exist (yet)."""
TOP_LEVEL = "(top level)"
_KEY_IN_MESSAGE = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+) ")


@dataclass(frozen=True)
class FieldError:
    """One problem of an edit: the dotted key (``destinations.TPS.port``) and what is wrong."""

    key: str
    message: str


class ConfigInvalidError(ConfigError):
    """An edit that the configuration model refuses; nothing was written."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("; ".join(f"{e.key}: {e.message}" for e in errors))
        self.errors = list(errors)


class ConfigConflictError(ConfigError):
    """The file changed since the editor read it (another admin, or an edit over SSH)."""


@dataclass(frozen=True)
class SaveResult:
    """What a save did."""

    changed: bool
    applied: bool
    version: str
    diff: list[str] = field(default_factory=list)
    restart_keys: list[str] = field(default_factory=list)


def field_errors(exc: ValidationError) -> list[FieldError]:
    """The pydantic errors of a config as dotted keys and plain messages."""
    errors = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt, or not supported here)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if not key:  # a whole-config rule names its key at the start of its message
            m = _KEY_IN_MESSAGE.match(msg)
            key = m.group(1) if m else TOP_LEVEL
        errors.append(FieldError(key, msg))
    return errors


def _value_at(data: Any, key: str) -> Any:
    for part in key.split("."):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def _item_key(data: Any, error: FieldError) -> FieldError:
    """A list-level error that quotes exactly one of the list's items points at that item
    (``node.allowed_calling_aets.2``), so a form can show it next to the right row."""
    items = _value_at(data, error.key)
    if not isinstance(items, list):
        return error
    hits = [
        i for i, item in enumerate(items) if isinstance(item, str) and repr(item) in error.message
    ]
    return FieldError(f"{error.key}.{hits[0]}", error.message) if len(hits) == 1 else error


def validate(data: Any) -> NodeConfig:
    """Validate file-shaped data with the configuration model; :class:`ConfigInvalidError`."""
    if not isinstance(data, dict):
        raise ConfigInvalidError([FieldError(TOP_LEVEL, "must be a mapping of sections")])
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigInvalidError([_item_key(data, e) for e in field_errors(exc)]) from None


# --------------------------------------------------------------------------- YAML round trip
def _yaml() -> YAML:
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 100
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(
        type(None), lambda r, _d: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return rt


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, Mapping | list)


def _to_yaml(value: Any) -> Any:
    """Plain data as ruamel nodes: mappings in block style, lists of scalars in flow style."""
    if isinstance(value, Mapping):
        node = CommentedMap()
        for k, v in value.items():
            node[k] = _to_yaml(v)
        return node
    if isinstance(value, list):
        seq = CommentedSeq([_to_yaml(v) for v in value])
        if all(_is_scalar(v) for v in value):
            seq.fa.set_flow_style()
        return seq
    return value


def _merge_seq(seq: CommentedSeq, value: list[Any]) -> None:
    if all(_is_scalar(v) for v in value):
        seq[:] = value
        seq.fa.set_flow_style()
        return
    for i, item in enumerate(value):
        if i < len(seq) and isinstance(seq[i], CommentedMap) and isinstance(item, Mapping):
            _merge_map(seq[i], item)
        elif i < len(seq):
            seq[i] = _to_yaml(item)
        else:
            seq.append(_to_yaml(item))
    del seq[len(value) :]
    seq.fa.set_block_style()


def _merge_map(node: CommentedMap, value: Mapping[str, Any]) -> None:
    """Make ``node`` hold ``value``, touching only what differs (comments stay)."""
    for key in [k for k in node if k not in value]:
        del node[key]
    for key, new in value.items():
        old = node.get(key) if key in node else None
        if key in node and old == new and type(old) is not bool and type(new) is not bool:
            continue  # unchanged: keep its formatting (quotes, flow style)
        if isinstance(old, CommentedMap) and isinstance(new, Mapping):
            if not old:
                old.fa.set_block_style()
            _merge_map(old, new)
        elif isinstance(old, CommentedSeq) and isinstance(new, list):
            _merge_seq(old, new)
        else:
            node[key] = _to_yaml(new)


def render(current_text: str | None, data: Mapping[str, Any]) -> str:
    """The YAML text of ``data``, keeping the comments and layout of ``current_text``."""
    rt = _yaml()
    doc: Any = None
    if current_text:
        try:
            doc = rt.load(current_text)
        except RuamelError:
            doc = None
    if not isinstance(doc, CommentedMap):
        doc = CommentedMap()
    _merge_map(doc, data)
    out = io.StringIO()
    rt.dump(doc, out)
    text = out.getvalue()
    if yaml.safe_load(text) != (dict(data) or None):
        log.warning("config: comments could not be kept in this edit; writing plain YAML")
        text = yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)
    return text


# --------------------------------------------------------------------------- the file
def _digest(text: str | None) -> str:
    return ABSENT if text is None else hashlib.sha256(text.encode()).hexdigest()[:32]


class ConfigFile:
    """The YAML file a running node reads, and its watcher (None: nothing runs on it)."""

    def __init__(
        self,
        path: Path,
        watcher: ConfigWatcher | None = None,
        overrides: Mapping[str, Any] | None = None,
        started: NodeConfig | None = None,
    ) -> None:
        """Edit ``path``; ``overrides`` are the command-line values the node runs with and
        ``started`` the configuration it started on (to say which changes need a restart)."""
        self.path = path
        self.watcher = watcher
        self.started = started
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self._lock = threading.Lock()

    @property
    def current(self) -> NodeConfig:
        """The configuration in force (the watcher's), else as the file reads now."""
        if self.watcher is not None:
            return self.watcher.current
        return read_config_file(self.path, self.overrides)

    def text(self) -> str | None:
        """The file's text, or None when there is no file."""
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: cannot read: {exc}") from exc

    def version(self) -> str:
        """A digest of the file's bytes (an ETag); :data:`ABSENT` when there is none."""
        return _digest(self.text())

    def read_raw(self) -> dict[str, Any]:
        """What the file holds, as plain data ({} for no file or an empty one)."""
        text = self.text()
        try:
            data = yaml.safe_load(text) if text else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.path}: invalid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: not a mapping of sections")
        return data

    def save(self, data: Mapping[str, Any], *, expected_version: str | None = None) -> SaveResult:
        """Validate ``data``, write it atomically into the file and apply it.

        Raises :class:`ConfigInvalidError` (nothing written) or :class:`ConfigConflictError`
        when ``expected_version`` is not the file's version any more.
        """
        data = copy.deepcopy(dict(data))
        with self._lock:
            text = self.text()
            version = _digest(text)
            if expected_version is not None and expected_version != version:
                raise ConfigConflictError(
                    f"{self.path} changed since it was read; reload and edit again"
                )
            validate(data)
            new_cfg = parse_config(
                data,
                source=str(self.path),
                base=self.path.parent.resolve(),
                overrides=self.overrides,
            )
            old_raw = self.read_raw()
            new_text = render(text, data)
            if text is not None and new_text == text:
                return SaveResult(changed=False, applied=True, version=version)
            self._write(new_text)
            applied = self._apply(new_cfg)
            return SaveResult(
                changed=True,
                applied=applied,
                version=_digest(new_text),
                diff=config_diff(old_raw, data),
                restart_keys=restart_needed(self.started, new_cfg) if self.started else [],
            )

    def _write(self, text: str) -> None:
        target = self.path.resolve()  # a symlinked file is replaced where it really lives
        try:
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = FILE_MODE
        write_text_durably(target, text, mode=mode)

    def _apply(self, expected: NodeConfig) -> bool:
        """Let the watcher take the new file now; True once the node runs on ``expected``."""
        if self.watcher is None:
            return False
        deadline = time.monotonic() + APPLY_TIMEOUT_SECONDS
        while True:
            self.watcher.check()  # the file is complete (atomic rename): two polls apply it
            if self.watcher.current == expected:
                return True
            if time.monotonic() > deadline:
                log.error(
                    "config written to %s but not applied within %.0f s",
                    self.path,
                    APPLY_TIMEOUT_SECONDS,
                )
                return False
            time.sleep(0.05)
