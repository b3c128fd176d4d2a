"""An embedded plain-text corpus that every machine has (text files are read by `readers.read_text_file`).

The default corpus is the documentation of Python's own standard library: the docstrings of every module,
class and function, read with `ast` from the installed sources (nothing is imported or executed). One
document per module.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files)


def module_docs(path: Path) -> str:
    """Docstrings of a module, its classes and functions, in source order, with headings."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append(f"{kind} {node.name}:\n{doc}")
    return "\n\n".join(parts)


def stdlib_documents(min_chars: int = 200) -> Iterator[tuple[str, str]]:
    """(id, text) for each standard-library module whose documentation has at least `min_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_sources():
        text = module_docs(path)
        if len(text) >= min_chars:
            yield str(path.relative_to(root)), text
