"""HTML forms drawn from the configuration's pydantic models, and their submissions read back.

A form is a list of :class:`FormField` made from a section model (``NodeSection``,
``Destination``, ...) and the values the file holds; a field's kind follows its type (text,
integer, number, checkbox, select, a set of checkboxes, a list of text rows, a nested group,
or YAML text for anything else). A section that gains a field (a ``tls`` group on
destinations, say) gets it in its form without touching the console.

Reading a submission only converts text to the field's type where that is unambiguous; the
model itself decides what is valid, so the form and the YAML file obey exactly the same rules.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

GetList = Callable[[str], list[str]]
"""The values submitted under one name (``FormData.getlist``)."""

ENABLED = "__enabled"
"""Suffix of the checkbox that switches an optional group on."""


class Kind(StrEnum):
    """How a field is shown and read."""

    TEXT = "text"
    INTEGER = "integer"
    NUMBER = "number"
    CHECKBOX = "checkbox"
    SELECT = "select"
    CHOICES = "choices"
    LIST = "list"
    GROUP = "group"
    YAML = "yaml"


@dataclass
class FormField:
    """One field of a form: its dotted name, how it is shown, its value and its error."""

    name: str
    label: str
    kind: Kind
    value: Any
    required: bool = False
    optional: bool = False
    choices: tuple[str, ...] = ()
    help: str = ""
    children: list[FormField] = field(default_factory=list)
    error: str | None = None
    item_errors: dict[int, str] = field(default_factory=dict)

    @property
    def rows(self) -> list[str]:
        """A list field's rows: its values and one empty row to add another."""
        return [*(str(v) for v in self.value or []), ""]


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """The type without ``Annotated`` and ``| None``, and whether None was allowed."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])[0], True
    return tp, False


def _choices(tp: Any) -> tuple[str, ...] | None:
    if get_origin(tp) is Literal:
        return tuple(str(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tuple(str(m.value) for m in tp)
    return None


def kind_of(annotation: Any) -> tuple[Kind, tuple[str, ...], Any, bool]:
    """A field type's kind, its choices, its inner model (groups) and whether it is optional."""
    tp, optional = _unwrap(annotation)
    choices = _choices(tp)
    if choices is not None:
        return Kind.SELECT, choices, None, optional
    if tp is bool:
        return Kind.CHECKBOX, (), None, optional
    if tp is int:
        return Kind.INTEGER, (), None, optional
    if tp is float:
        return Kind.NUMBER, (), None, optional
    if tp in (str, Path):
        return Kind.TEXT, (), None, optional
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return Kind.GROUP, (), tp, optional
    if get_origin(tp) is list:
        item, _ = _unwrap(get_args(tp)[0])
        item_choices = _choices(item)
        if item_choices is not None:
            return Kind.CHOICES, item_choices, None, optional
        if item in (str, Path):
            return Kind.LIST, (), None, optional
    return Kind.YAML, (), None, optional


def default_json(info: FieldInfo) -> Any:
    """A field's default as plain data (what the file would say), or None when required."""
    if info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    return TypeAdapter(Any).dump_python(value, mode="json")


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _shown(kind: Kind, value: Any) -> Any:
    if kind in (Kind.CHOICES, Kind.LIST):
        return [str(v) for v in value or []]
    if kind == Kind.CHECKBOX:
        return bool(value)
    if kind == Kind.YAML:
        return "" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
    return "" if value is None else str(value)


def build_form(
    model: type[BaseModel],
    values: Mapping[str, Any] | None,
    *,
    prefix: str = "",
    help_texts: Mapping[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> list[FormField]:
    """The fields of ``model`` showing ``values`` (what the file holds; defaults elsewhere)."""
    values = values or {}
    help_texts = help_texts or {}
    fields = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        kind, choices, inner, optional = kind_of(info.annotation)
        value = values[name] if name in values else default_json(info)
        f = FormField(
            name=prefix + name,
            label=_label(name),
            kind=kind,
            value=_shown(kind, value) if kind != Kind.GROUP else value is not None,
            required=info.is_required(),
            optional=optional,
            choices=choices,
            help=info.description or help_texts.get(name, ""),
        )
        if inner is not None:
            sub = value if isinstance(value, Mapping) else {}
            f.children = build_form(inner, sub, prefix=f"{prefix}{name}.", help_texts=help_texts)
        fields.append(f)
    return fields


def _first(getlist: GetList, name: str) -> str:
    values = getlist(name)
    return values[0].strip() if values else ""


def _number(raw: str, kind: Kind) -> Any:
    """Text as an int or float; the text itself when it is not one (the model says why)."""
    try:
        return int(raw) if kind == Kind.INTEGER else float(raw)
    except ValueError:
        return raw


def parse_form(
    model: type[BaseModel], getlist: GetList, *, prefix: str = "", skip: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """A submitted form as file-shaped data for ``model``, and errors of unreadable fields.

    An empty text field is left out (its default applies; a required one is then reported
    missing by the model); an empty optional field is null.
    """
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = prefix + name
        kind, _, inner, optional = kind_of(info.annotation)
        if kind == Kind.GROUP:
            if optional and not getlist(key + ENABLED):
                data[name] = None
                continue
            data[name], sub_errors = parse_form(inner, getlist, prefix=key + ".")
            errors.update(sub_errors)
        elif kind == Kind.CHECKBOX:
            data[name] = bool(getlist(key))
        elif kind == Kind.CHOICES:
            data[name] = [v for v in getlist(key) if v]
        elif kind == Kind.LIST:
            data[name] = [v.strip() for v in getlist(key) if v.strip()]
        else:
            raw = _first(getlist, key)
            if not raw:
                if optional:
                    data[name] = None
                continue
            if kind == Kind.YAML:
                try:
                    data[name] = yaml.safe_load(raw)
                except yaml.YAMLError as exc:
                    errors[key] = f"not valid YAML: {getattr(exc, 'problem', exc)}"
            elif kind in (Kind.INTEGER, Kind.NUMBER):
                data[name] = _number(raw, kind)
            else:
                data[name] = raw
    return data, errors


def merge_section(
    model: type[BaseModel], current: Mapping[str, Any] | None, submitted: Mapping[str, Any]
) -> dict[str, Any]:
    """The section as the file should hold it after a form: keys the file already had take
    the submitted value; keys it lacked are added only when they differ from the default
    (a form never writes defaults into a file that did not state them)."""
    out = dict(current or {})
    for name, info in model.model_fields.items():
        if name not in submitted:
            if name in out and not info.is_required():
                del out[name]
            continue
        value = submitted[name]
        kind, _, inner, _optional = kind_of(info.annotation)
        if kind == Kind.GROUP and isinstance(value, Mapping):
            old = out.get(name)
            merged = merge_section(inner, old if isinstance(old, Mapping) else None, value)
            if name in out or merged:
                out[name] = merged
        elif name in out or info.is_required() or value != default_json(info):
            out[name] = value
    return out


def attach_errors(fields: list[FormField], errors: Mapping[str, str], prefix: str) -> set[str]:
    """Put each error next to its field (``prefix`` + field name); returns the keys placed."""
    placed: set[str] = set()
    for f in fields:
        key = prefix + f.name
        if key in errors:
            f.error = errors[key]
            placed.add(key)
        for err_key, message in errors.items():
            head, _, tail = err_key.rpartition(".")
            if head == key and tail.isdigit():
                f.item_errors[int(tail)] = message
                placed.add(err_key)
            elif f.kind != Kind.GROUP and err_key.startswith(key + ".") and err_key not in placed:
                f.error = message  # e.g. an error inside a YAML field's value
                placed.add(err_key)
        placed |= attach_errors(f.children, errors, prefix)
    return placed
