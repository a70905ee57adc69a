"""The shape of the code base, checked: no import cycle, short functions, one definition of shared constants."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE_DIRS = {"minimind_scale": REPO / "minimind_scale", "minimind_scale.stages": REPO / "stages"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules `name` imports anywhere in its file, inside functions included."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when one exists, and pkg itself either way.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycle():
    mods = modules()
    graph = {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert graph["minimind_scale.data"], "the import graph found no edge: the checker itself is broken"
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def function_lengths() -> dict[str, int]:
    lengths = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{name}.{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_functions_are_short():
    lengths = function_lengths()
    long = {k: n for k, n in lengths.items() if n > 80}
    assert not long, f"functions over 80 lines: {long}"
    train = [n for k, n in lengths.items() if k.startswith("minimind_scale.engine.train:")]
    assert train and train[0] <= 60, f"engine.train is {train} lines"


def test_shared_constants_are_defined_once():
    definitions = []
    for name, path in modules().items():
        text = path.read_text()
        definitions += [name for _ in re.finditer(r"^IGNORE_INDEX\s*=", text, flags=re.M)]
        literal = [node.lineno for node in ast.walk(ast.parse(text)) if isinstance(node, ast.UnaryOp)
                   and isinstance(node.op, ast.USub) and getattr(node.operand, "value", None) == 100]
        assert literal == [] or name == "minimind_scale.rows", f"{path}:{literal} writes -100 instead of IGNORE_INDEX"
    assert definitions == ["minimind_scale.rows"]
    for check in ("def check_fp16_available", "def check_group_size"):
        assert sum(check in p.read_text() for p in modules().values()) == 1, check


def test_no_comment_cites_a_document_outside_the_repository():
    for folder in (REPO / "minimind_scale", REPO / "stages", REPO / "tests", REPO / "benchmarks", REPO / "examples"):
        for path in folder.rglob("*.py"):
            cited = re.search(r"DESIGN(\.md| ?§| section)", path.read_text())
            assert not cited, f"{path} cites {cited.group(0)!r}, a document that is not part of this repository"
