"""Write docs/contracts.md: the public interface of every module, generated from the code.

Each module's first docstring line, then its public classes (with their public methods) and
functions with their signatures, as the source spells them. Nothing is imported or run, so the
document cannot drift from the code: ``tests/test_contracts.py`` fails when the committed file
differs from what this script writes.

    python scripts/contracts.py            # rewrite docs/contracts.md
    python scripts/contracts.py --check    # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "contracts.md"
PACKAGES = ("dicom_node", "fusion_engine")
SKIP = ("migrations/versions",)

HEADER = """# Module contracts (generated)

The public names and signatures of every module of `dicom_node` and `fusion_engine`, generated
from the source by `python scripts/contracts.py` (a test fails when this file is out of date).
Rules that hold across modules are in the README's Architecture section and are checked by
`tests/test_structure.py`.
"""


def _first_line(tree: ast.Module) -> str:
    doc = ast.get_docstring(tree)
    return doc.strip().splitlines()[0] if doc else ""


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(fn.args)
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    prefix = "async def" if isinstance(fn, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {fn.name}({args}){returns}"


def _public(name: str) -> bool:
    return not name.startswith("_")


def _class_lines(cls: ast.ClassDef) -> Iterator[str]:
    bases = ", ".join(ast.unparse(b) for b in cls.bases)
    yield f"class {cls.name}({bases})" if bases else f"class {cls.name}"
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _public(node.name):
            yield f"    {_signature(node)}"


def _module_section(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and _public(node.name):
            lines.extend(_class_lines(node))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _public(node.name):
            lines.append(_signature(node))
    rel = path.relative_to(REPO).as_posix()
    out = [f"### `{rel}`", "", _first_line(tree), ""]
    if lines:
        out += ["```python", *lines, "```", ""]
    return out


def render() -> str:
    """The whole document."""
    parts = [HEADER]
    for package in PACKAGES:
        parts.append(f"## {package}\n")
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if any(s in rel for s in SKIP):
                continue
            parts.append("\n".join(_module_section(path)))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the document, or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python scripts/contracts.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
