"""Shared pieces of the config models: AE title rule, path resolution in nested sections."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from dicom_node.config_base import Section, check_ae_title, resolve_path, resolve_paths_in


class Inner(Section):
    path: Path
    other: Path | None = None
    label: str = "x"


class Outer(Section):
    inner: Inner
    many: dict[str, Inner] = Field(default_factory=dict)
    top: Path = Path("top")


def test_ae_titles() -> None:
    assert check_ae_title(" CT_SIM ") == "CT_SIM"
    for bad in ("", "   ", "A" * 17, "BACK\\SLASH", "tab\there"):
        with pytest.raises(ValueError, match="not a valid AE title"):
            check_ae_title(bad)


def test_resolve_paths_in_nested_sections(tmp_path: Path) -> None:
    model = Outer(inner=Inner(path=Path("a.pem")), many={"X": Inner(path=Path("/abs/b.pem"))})
    resolved = resolve_paths_in(model, tmp_path)
    assert resolved.inner.path == tmp_path / "a.pem" and resolved.inner.other is None
    assert resolved.many["X"].path == Path("/abs/b.pem")
    assert resolved.top == tmp_path / "top"
    assert resolve_path(Path("../c"), tmp_path / "etc") == tmp_path / "c"
    assert resolve_path(Path("~/d"), tmp_path) == Path.home() / "d"
