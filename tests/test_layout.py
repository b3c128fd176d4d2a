"""The shape of the package: thin entry points that nothing imports, and a layout the docs describe."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from llmforge import cli
from tests.conftest import ROOT

PACKAGE = ROOT / "llmforge"
# `python -m llmforge.<x>` modules: argument handling and a call into the library
ENTRY_POINTS = (
    "llmforge.train",
    "llmforge.prepare",
    "llmforge.plot",
    "llmforge.estimate.__main__",
    "llmforge.generate",
    "llmforge.evaluate",
    "llmforge.export",
    "llmforge.consolidate",
    "llmforge.inspect",
    "llmforge.tokenizer",
    "llmforge.lm_eval",
    "llmforge.cli",
)
MAX_ENTRY_POINT_LINES = 120


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` statement of the file names (``from a import b``: ``a`` and ``a.b``)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_entry_points_exist_and_the_cli_runs_them():
    present = {name for name in ENTRY_POINTS if module_path(name).exists()}
    assert set(ENTRY_POINTS) - present <= {"llmforge.inspect"}, set(ENTRY_POINTS) - present
    for module, _ in cli.COMMANDS.values():
        run = module if module_path(module).exists() else f"{module}.__main__"
        assert run in ENTRY_POINTS, run


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_are_thin(name):
    path = module_path(name)
    if not path.exists():
        pytest.skip(f"{name} is not in this tree")
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_ENTRY_POINT_LINES, f"{path.relative_to(ROOT)}: {lines} lines"


def test_no_module_imports_an_entry_point():
    wrong = []
    for path in library_modules():
        for name in sorted(imported_modules(path) & set(ENTRY_POINTS)):
            if name != module_name(path):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_one_progress_style():
    # prepare, train, evaluate and consolidate report progress through Rich, none through tqdm
    users = [str(p.relative_to(ROOT)) for p in library_modules() if "tqdm" in imported_modules(p)]
    assert not users, users


def test_imported_modules_reads_relative_and_package_imports(tmp_path):
    # the checker itself: `from llmforge import generate` names llmforge.generate
    names = imported_modules(PACKAGE / "callbacks" / "__init__.py")
    assert "llmforge.callbacks.stability.StabilityGuard" in names
    assert "llmforge.config.register" in imported_modules(PACKAGE / "train.py")


def layout_block(text: str, root: str) -> list[str]:
    """The paths of a tree in a fenced block that starts with the line ``root/``: two spaces per level,
    a name, then a comment."""
    block = re.search(rf"```[a-z]*\n({re.escape(root)}/\n.*?)```", text, re.S)
    assert block, f"no layout block starting with {root}/"
    stack: list[str] = []
    paths = []
    for line in block.group(1).splitlines()[1:]:
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = stack[: indent - 1] + [name.rstrip("/")]
        if name.endswith(".py"):
            paths.append("/".join(stack))
    return paths


@pytest.mark.parametrize("doc", ["docs/architecture.md", "README.md"])
def test_the_documented_layout_is_the_tree(doc):
    """docs/architecture.md and the README list every module of the package, and only those."""
    listed = set(layout_block((ROOT / doc).read_text(), "llmforge"))
    actual = {str(p.relative_to(PACKAGE)) for p in library_modules() if p.name != "__init__.py"}
    assert sorted(actual - listed) == [], f"modules missing from {doc}'s layout"
    assert sorted(listed - actual) == [], f"{doc}'s layout names modules that do not exist"


def test_the_repository_explains_itself():
    """Design notes live in docs/: nothing names a notes file outside the repository."""
    outside = re.compile(r"\bARCHITECTURE\.md|shared/ARCHITECTURE")
    files = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".yaml", ".ipynb", ".sh", ".toml"}]
    files = [p for p in files if not {".venv", ".git", "runs", "data"} & set(p.relative_to(ROOT).parts)]
    files = [p for p in files if p.resolve() != Path(__file__).resolve()]  # this test names the pattern
    named = [str(p.relative_to(ROOT)) for p in files if outside.search(p.read_text(errors="replace"))]
    assert named == []
