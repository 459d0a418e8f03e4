"""The repository's shape, enforced: the pipelines import only operators (never each other), no
test module imports another, and the tests mirror the tree."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_pipelines_import_only_operators():
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        ours = {m for m in imported_modules(path) if m.split(".")[0] in ("pipelines", "tests")}
        assert not ours, f"{path.name} imports {sorted(ours)}: a pipeline wires operators, and imports no other pipeline"


def test_no_test_module_imports_another():
    for path in sorted((ROOT / "tests").rglob("*.py")):
        others = {m for m in imported_modules(path) if m.startswith("tests.") and m.split(".")[1] not in ("helpers", "conftest")}
        others = {m for m in others if not m.startswith(("tests.helpers", "tests.conftest"))}
        assert not others, f"{path.relative_to(ROOT)} imports {sorted(others)}: shared code goes to tests/helpers.py"


def test_the_tests_mirror_the_tree():
    for folder in ("operators", "pipelines", "configs", "infra"):
        for path in sorted((ROOT / "tests" / folder).glob("test_*.py")):
            name = path.stem.removeprefix("test_")
            if folder in ("operators", "pipelines"):
                assert (ROOT / folder / f"{name}.py").exists(), f"tests/{folder}/{path.name} tests no {folder}/{name}.py"
    for module in sorted((ROOT / "pipelines").glob("*.py")):
        if module.stem != "__init__":
            assert (ROOT / "tests" / "pipelines" / f"test_{module.stem}.py").exists(), f"no tests for pipelines/{module.name}"
