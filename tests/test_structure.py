"""The rules of the house, checked on the source text (imports and definitions, no execution).

- dependencies point one way: ``dicom_node`` -> ``fusion_engine``; ``fusion_engine`` imports
  no DICOM, network or database library and nothing of ``dicom_node``;
- what a worker runs never imports ``fusion_engine.research``;
- pynetdicom only in ``dicom_node/net/``; SQLAlchemy engines only in ``dicom_node/db.py``;
- small functions (at most 80 lines) and modules (at most 600 lines);
- tests mirror the code: every ``dicom_node`` module with logic has its test module, and tests
  import helpers from plain modules, never from a conftest or another test module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import REPO

PACKAGES = ("dicom_node", "fusion_engine")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600
MIGRATION_VERSIONS = REPO / "dicom_node" / "migrations" / "versions"
"""Alembic revisions: DDL listings written once and never edited, exempt from the size rules."""

FORBIDDEN_IN_FUSION_ENGINE = ("pynetdicom", "pydicom", "highdicom", "sqlalchemy", "dicom_node")
RESEARCH_USERS = ("fusion_engine/research/", "fusion_engine/cli.py")
"""The only places that may import ``fusion_engine.research`` (training, evaluation, the
research command line); everything else is what a worker runs."""

UNTESTED_ON_PURPOSE: dict[str, str] = {
    "dicom_node/logs.py": "logging set-up, exercised by every node process started in tests",
    "dicom_node/cli/common.py": "argument and console helpers of the command modules' tests",
    "dicom_node/cli/serve.py": "serve/worker wiring, run as real processes by the e2e tests",
    "dicom_node/cli/net.py": "echo/send commands, tested in tests/dicom_node/cli/test_cli.py",
    "dicom_node/cli/fuse.py": "the fuse command, tested in imaging/test_offline.py",
    "dicom_node/cli/config.py": "config check, tested in tests/dicom_node/cli/test_cli.py",
    "dicom_node/cli/series.py": "the series command, tested in tests/dicom_node/net/test_scp.py",
    "dicom_node/orchestration/embedded.py": "the embedded worker process, killed and restarted "
    "in tests/e2e/test_e2e.py",
    "dicom_node/orchestration/scheduler.py": "periodic tasks of serve, driven by the e2e tests",
    "dicom_node/storage/index.py": "index rows of the store, tested through test_store.py",
    "dicom_node/imaging/preview.py": "the preview PNG, checked in test_offline.py",
    "dicom_node/imaging/derive/common.py": "shared modules of the derived objects, test_derive.py",
    "dicom_node/imaging/derive/images.py": "derived image series, tested in test_derive.py",
    "dicom_node/imaging/derive/registration.py": "the REG object, tested in test_derive.py",
    "dicom_node/migrations/env.py": "Alembic environment, run by test_db.py",
}


@dataclass(frozen=True)
class Module:
    """One source file of a package."""

    path: Path
    tree: ast.Module
    lines: int

    @property
    def rel(self) -> str:
        """Path relative to the repository, with forward slashes."""
        return self.path.relative_to(REPO).as_posix()

    def imports(self) -> Iterator[str]:
        """Every module name this file imports (absolute names; relative ones resolved)."""
        package = ".".join(self.path.relative_to(REPO).with_suffix("").parts[:-1])
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    yield f"{base}.{node.module}" if node.module else base
                elif node.module:
                    yield node.module
                    yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _modules(*roots: str) -> list[Module]:
    found = []
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            found.append(Module(path, ast.parse(text), len(text.splitlines())))
    return found


SOURCES = _modules(*PACKAGES)
TESTS = _modules("tests")


def _top(name: str) -> str:
    return name.split(".")[0]


def test_fusion_engine_imports_no_dicom_network_or_database_code() -> None:
    bad = [
        f"{m.rel}: {name}"
        for m in SOURCES
        if m.rel.startswith("fusion_engine/")
        for name in m.imports()
        if _top(name) in FORBIDDEN_IN_FUSION_ENGINE
    ]
    assert not bad, bad


def test_worker_code_never_imports_research() -> None:
    bad = [
        f"{m.rel}: {name}"
        for m in SOURCES
        if not m.rel.startswith(RESEARCH_USERS)
        for name in m.imports()
        if name.startswith("fusion_engine.research")
    ]
    assert not bad, bad


def test_pynetdicom_only_in_net() -> None:
    bad = [
        f"{m.rel}: {name}"
        for m in SOURCES
        if not m.rel.startswith("dicom_node/net/")
        for name in m.imports()
        if _top(name) == "pynetdicom"
    ]
    assert not bad, bad


def test_engines_made_only_in_db() -> None:
    bad = [
        m.rel
        for m in SOURCES
        if m.rel != "dicom_node/db.py"
        for name in m.imports()
        if name in ("sqlalchemy.create_engine", "sqlalchemy.engine.create_engine")
    ]
    assert not bad, bad


def _is_migration(m: Module) -> bool:
    return m.path.is_relative_to(MIGRATION_VERSIONS)


def test_modules_are_small() -> None:
    big = [f"{m.rel}: {m.lines} lines" for m in SOURCES if m.lines > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_are_small() -> None:
    long = [
        f"{m.rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for m in SOURCES
        if not _is_migration(m)
        for node in ast.walk(m.tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _has_logic(m: Module) -> bool:
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) for node in ast.walk(m.tree)
    )


def _test_module_for(m: Module) -> Path:
    """``pkg/mod.py`` -> ``tests/pkg/test_mod.py``; ``pkg/sub/__init__.py`` ->
    ``tests/pkg/sub/test_sub.py``."""
    rel = m.path.relative_to(REPO)
    name = rel.stem if rel.stem != "__init__" else rel.parent.name
    return REPO / "tests" / rel.parent / f"test_{name}.py"


def test_every_dicom_node_module_with_logic_has_a_test_module() -> None:
    missing = [
        f"{m.rel} -> {_test_module_for(m).relative_to(REPO)}"
        for m in SOURCES
        if m.rel.startswith("dicom_node/")
        and not _is_migration(m)
        and _has_logic(m)
        and m.rel not in UNTESTED_ON_PURPOSE
        and not _test_module_for(m).exists()
    ]
    assert not missing, missing


@pytest.mark.parametrize("rel", sorted(UNTESTED_ON_PURPOSE))
def test_exemptions_name_existing_modules(rel: str) -> None:
    assert (REPO / rel).exists(), f"{rel} is exempt but no longer exists: drop the exemption"


def test_tests_import_helpers_only_from_plain_modules() -> None:
    bad = [
        f"{m.rel}: {name}"
        for m in TESTS
        for name in m.imports()
        if name.startswith("tests.")
        and any(part == "conftest" or part.startswith("test_") for part in name.split("."))
    ]
    assert not bad, bad
