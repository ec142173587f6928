"""Forms drawn from the config models: kinds, values, submissions, minimal file edits, errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from dicom_node.config import Destination, NodeSection
from dicom_node.console.forms import (
    ENABLED,
    Kind,
    attach_errors,
    build_form,
    kind_of,
    merge_section,
    parse_form,
)
from dicom_node.states import DEFAULT_SEND_KINDS, DerivedKind


class _Tls(BaseModel):
    """What a destination's TLS settings might look like."""

    model_config = ConfigDict(extra="forbid")
    ca_file: str
    verify_host: bool = True


class _DestinationWithTls(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ae_title: str
    port: Annotated[int, Field(ge=1, le=65535)]
    send: list[DerivedKind] = Field(default_factory=lambda: list(DerivedKind))
    tls: _Tls | None = None
    mode: Literal["a", "b"] = "a"
    ratio: float | None = None
    extra: dict[str, int] = Field(default_factory=dict)


def _getlist(form: dict[str, list[str]]) -> Callable[[str], list[str]]:
    return lambda name: form.get(name, [])


def test_kinds_follow_types() -> None:
    fields = {f.name: f for f in build_form(_DestinationWithTls, {})}
    assert fields["ae_title"].kind == Kind.TEXT and fields["ae_title"].required
    assert fields["port"].kind == Kind.INTEGER
    assert fields["send"].kind == Kind.CHOICES
    assert fields["send"].choices == ("fused", "registered_mr", "reg", "qa")
    assert fields["send"].value == ["fused", "registered_mr", "reg", "qa"]  # the default
    assert fields["tls"].kind == Kind.GROUP and fields["tls"].optional
    assert [c.name for c in fields["tls"].children] == ["tls.ca_file", "tls.verify_host"]
    assert fields["mode"].kind == Kind.SELECT and fields["mode"].choices == ("a", "b")
    assert fields["ratio"].kind == Kind.NUMBER and fields["ratio"].optional
    assert fields["extra"].kind == Kind.YAML
    assert kind_of(list[str])[0] == Kind.LIST
    assert kind_of(bool)[0] == Kind.CHECKBOX


def test_node_section_form_shows_file_values_and_defaults() -> None:
    fields = {f.name: f for f in build_form(NodeSection, {"allowed_calling_aets": ["CT_SIM"]})}
    assert fields["allowed_calling_aets"].rows == ["CT_SIM", ""]  # one empty row to add one
    assert fields["port"].value == "11112"  # the default, as the file does not say
    assert fields["ae_title"].value == "FUSIONNODE"


def test_parse_converts_where_unambiguous_and_keeps_bad_text() -> None:
    form = {
        "ae_title": [" PACS "],
        "port": ["seventy"],
        "send": ["fused", "reg"],
        "tls" + ENABLED: ["on"],
        "tls.ca_file": ["/etc/ca.pem"],
        "mode": ["b"],
        "ratio": [""],
        "extra": ["{a: 1"],
    }
    data, errors = parse_form(_DestinationWithTls, _getlist(form))
    assert data["ae_title"] == "PACS"
    assert data["port"] == "seventy"  # the model says why this is wrong
    assert data["send"] == ["fused", "reg"]
    assert data["tls"] == {"ca_file": "/etc/ca.pem", "verify_host": False}
    assert data["ratio"] is None
    assert "extra" not in data and errors["extra"].startswith("not valid YAML")
    data, _ = parse_form(_DestinationWithTls, _getlist({"port": ["104"], "extra": ["{a: 1}"]}))
    assert data["port"] == 104 and data["tls"] is None and data["extra"] == {"a": 1}
    assert "ae_title" not in data  # empty: left to the model (required: reported missing)


def test_merge_writes_no_defaults_the_file_did_not_state() -> None:
    submitted = {"ae_title": "PACS", "host": "pacs", "port": 104, "send": list(DEFAULT_SEND_KINDS)}
    assert merge_section(Destination, None, submitted) == {
        "ae_title": "PACS",
        "host": "pacs",
        "port": 104,
    }
    stated = {"ae_title": "PACS", "host": "pacs", "port": 104, "send": ["fused", "registered_mr"]}
    merged = merge_section(Destination, stated, {**submitted, "send": ["fused", "registered_mr"]})
    assert merged["send"] == ["fused", "registered_mr"]  # the file said it: it stays
    node = merge_section(NodeSection, {"port": 11112, "foo": 1}, {"port": 11112})
    assert node == {"port": 11112, "foo": 1}  # unknown keys are left for the model to refuse


def test_merge_drops_an_emptied_optional_key() -> None:
    merged = merge_section(NodeSection, {"ae_title": "X", "host": "1.2.3.4"}, {"ae_title": "X"})
    assert merged == {"ae_title": "X"}


def test_errors_land_next_to_their_field_and_row() -> None:
    fields = build_form(NodeSection, {"allowed_calling_aets": ["OK", "BAD\\"]})
    errors = {
        "node.port": "Input should be less than or equal to 65535",
        "node.allowed_calling_aets.1": "not a valid AE title",
        "storage.root": "elsewhere",
    }
    placed = attach_errors(fields, errors, "node.")
    by_name = {f.name: f for f in fields}
    assert by_name["port"].error == "Input should be less than or equal to 65535"
    assert by_name["allowed_calling_aets"].item_errors == {1: "not a valid AE title"}
    assert placed == {"node.port", "node.allowed_calling_aets.1"}


def test_group_child_errors() -> None:
    fields = build_form(_DestinationWithTls, {"tls": {"ca_file": ""}})
    attach_errors(fields, {"destinations.X.tls.ca_file": "file not found"}, "destinations.X.")
    tls = next(f for f in fields if f.name == "tls")
    assert tls.value is True
    assert tls.children[0].error == "file not found"


def test_blank_port_keeps_the_plain_listener() -> None:
    """node.port may be null (plain DICOM off), but a blank field must not switch it off."""
    data, errors = parse_form(NodeSection, lambda key: [""] if key == "port" else [])
    assert "port" not in data and not errors
    data, _ = parse_form(NodeSection, lambda key: ["104"] if key == "port" else [])
    assert data["port"] == 104
