"""The repository's shape, enforced: operators/ in sub-packages that depend one way, with no import
circle and Ray in the execution adapter only; the pipelines import only operators (never each
other); no test module imports another; and the tests mirror the tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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
    for folder in ("operators", "pipelines"):
        for path in sorted((ROOT / "tests" / folder).rglob("test_*.py")):
            rel = path.relative_to(ROOT / "tests").with_name(path.name.removeprefix("test_"))
            assert (ROOT / rel).exists(), f"tests/{path.relative_to(ROOT / 'tests')} tests no {rel}"
    assert not list((ROOT / "tests" / "operators").glob("test_*.py")), "operator tests live beside their sub-package's name"
    for package in SUBPACKAGES:
        assert (ROOT / "tests" / "operators" / package).is_dir(), f"no tests/operators/{package}/"
    for module in sorted((ROOT / "pipelines").glob("*.py")):
        if module.stem != "__init__":
            assert (ROOT / "tests" / "pipelines" / f"test_{module.stem}.py").exists(), f"no tests for pipelines/{module.name}"


# The sub-packages of operators/, and what each may import (its docstring says the same). Read as
# layers: methods -> config -> io -> model -> execution | evaluation -> run.
MAY_IMPORT = {
    "methods": set(),
    "config": {"methods"},
    "io": {"config", "methods"},
    "model": {"io", "config", "methods"},
    "execution": {"model", "io", "config", "methods"},
    "evaluation": {"model", "io", "config", "methods"},
    "run": {"execution", "evaluation", "model", "io", "config", "methods"},
}
SUBPACKAGES = tuple(MAY_IMPORT)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def operator_imports(path: Path) -> set[str]:
    """The operators modules `path` imports, at the top or inside a function ('from operators.io
    import cache' counts as operators.io.cache; the bare package version is no dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "operators"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "operators":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if (ROOT / (sub.replace(".", "/") + ".py")).exists() or (ROOT / sub.replace(".", "/")).is_dir():
                    out.add(sub)
                elif a.name != "__version__":
                    out.add(node.module)
    return out


def operator_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "operators").rglob("*.py"))}


def test_operators_are_sub_packages_each_with_its_rule():
    assert {p.name for p in (ROOT / "operators").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(SUBPACKAGES)
    assert [p.name for p in (ROOT / "operators").glob("*.py")] == ["__init__.py"], "every module lives in a sub-package"
    for package in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / "operators" / package / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"operators/{package}/__init__.py: say what it holds and what it may import"


def test_dependencies_run_one_way():
    for name, path in operator_modules().items():
        package = name.split(".")[1] if "." in name else None
        for dep in operator_imports(path):
            target = dep.split(".")[1] if "." in dep else None
            if package and target and target != package:
                assert target in MAY_IMPORT[package], f"{name} imports {dep}: {package} may import only {sorted(MAY_IMPORT[package])}"


def test_no_import_circles():
    graph = {name: {d for d in operator_imports(path) if d in operator_modules() and d.count(".") == 2}
             for name, path in operator_modules().items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt]
                raise AssertionError("an import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_only_the_execution_adapter_imports_ray():
    for name, path in operator_modules().items():
        rays = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                rays |= {a.name for a in node.names if a.name.split(".")[0] == "ray"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ray":
                rays.add(node.module)
        if not name.startswith("operators.execution"):
            assert not rays, f"{name} imports {sorted(rays)}: only operators/execution/ knows about Ray"


def test_the_layout_test_catches_a_circle_and_a_wrong_way_import(tmp_path, monkeypatch):
    """The checks above on a house built wrong: io importing run, and two modules importing each other."""
    fake = tmp_path
    for package in SUBPACKAGES:
        (fake / "operators" / package).mkdir(parents=True)
        (fake / "operators" / package / "__init__.py").write_text('"""May import: ..."""\n')
    (fake / "operators" / "__init__.py").write_text("")
    (fake / "operators" / "io" / "a.py").write_text("from operators.run.b import x\n")
    (fake / "operators" / "run" / "b.py").write_text("def f():\n    from operators.io.a import y\n")
    monkeypatch.setitem(globals(), "ROOT", fake)
    with pytest.raises(AssertionError, match="operators.io.a imports operators.run.b"):
        test_dependencies_run_one_way()
    with pytest.raises(AssertionError, match="an import circle: operators.io.a -> operators.run.b -> operators.io.a"):
        test_no_import_circles()
