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
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if name.startswith("minimind_scale.stages.") and package == "minimind_scale":
                continue
            found[name] = path
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
    assert graph["minimind_scale.data.prepare"], "the import graph found no edge: the checker itself is broken"
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
    train = [n for k, n in lengths.items() if k.startswith("minimind_scale.training.engine.train:")]
    assert train and train[0] <= 60, f"engine.train is {train} lines"


def test_shared_constants_are_defined_once():
    definitions = []
    for name, path in modules().items():
        text = path.read_text()
        definitions += [name for _ in re.finditer(r"^IGNORE_INDEX\s*=", text, flags=re.M)]
        literal = [node.lineno for node in ast.walk(ast.parse(text)) if isinstance(node, ast.UnaryOp)
                   and isinstance(node.op, ast.USub) and getattr(node.operand, "value", None) == 100]
        assert literal == [] or name == "minimind_scale.data.rows", \
            f"{path}:{literal} writes -100 instead of IGNORE_INDEX"
    assert definitions == ["minimind_scale.data.rows"]
    for check in ("def check_fp16_available", "def check_group_size"):
        assert sum(check in p.read_text() for p in modules().values()) == 1, check


def test_no_comment_cites_a_document_outside_the_repository():
    for folder in (REPO / "minimind_scale", REPO / "stages", REPO / "tests", REPO / "benchmarks", REPO / "examples"):
        for path in folder.rglob("*.py"):
            cited = re.search(r"DESIGN(\.md| ?§| section)", path.read_text())
            assert not cited, f"{path} cites {cited.group(0)!r}, a document that is not part of this repository"


def test_top_level_holds_the_cli_config_errors_and_api_only():
    top = sorted(p.name for p in (REPO / "minimind_scale").glob("*.py"))
    assert len(top) <= 8, f"minimind_scale/ has {len(top)} top-level modules: {top}"
    packages = [p for p in (REPO / "minimind_scale").iterdir() if (p / "__init__.py").exists()]
    assert len(packages) >= 6, packages
    import tomllib

    shipped = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for package in packages:
        assert f"minimind_scale.{package.name}" in shipped, f"pyproject.toml does not ship {package.name}/"
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 4, f"{package}/__init__.py names no job in its docstring"


def test_no_stage_imports_another_stage():
    mods = modules()
    stage_names = {n for n in mods if n.startswith("minimind_scale.stages.")}
    assert len(stage_names) >= 9, stage_names
    for name in sorted(stage_names):
        imported = imported_modules(name, mods[name], set(mods))
        others = sorted(i for i in imported if i.startswith("minimind_scale.stages") and i != name)
        assert not others, f"{name} imports {others}: shared code belongs in the library"


def test_examples_import_only_the_public_api():
    import minimind_scale

    public = set(minimind_scale.__all__)
    examples = sorted((REPO / "examples").glob("*.py"))
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = [(page.name, block) for page in pages
              for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]
    sources = [(str(p), p.read_text()) for p in examples] + blocks
    checked = 0
    for where, source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minimind_scale"):
                assert node.module == "minimind_scale", f"{where} imports from {node.module}, not the public API"
                missing = [a.name for a in node.names if a.name not in public]
                assert not missing, f"{where} imports {missing}, which minimind_scale does not export"
                checked += 1
            elif isinstance(node, ast.Import):
                inner = [a.name for a in node.names if a.name.startswith("minimind_scale.")]
                assert not inner, f"{where} imports {inner}, not the public API"
    assert checked >= 2, "no example imports minimind_scale: the check itself is broken"


def test_public_names_and_old_module_paths_import():
    import importlib

    import minimind_scale
    from minimind_scale.compat import MOVED, SPLIT

    for name in minimind_scale.__all__:
        assert getattr(minimind_scale, name) is not None, name
    for old, new in MOVED.items():
        assert importlib.import_module(f"minimind_scale.{old}") is importlib.import_module(f"minimind_scale.{new}")
    for old, parts in SPLIT.items():  # every public name of the part modules is reachable from the old path
        alias = importlib.import_module(f"minimind_scale.{old}")
        for part in parts:
            for name in [n for n in vars(importlib.import_module(f"minimind_scale.{part}")) if not n.startswith("_")]:
                assert hasattr(alias, name), f"minimind_scale.{old}.{name}"
    from minimind_scale.conversation import encode_chat, normalize_messages, render_chat  # a split module
    from minimind_scale.tools import load_tools, parse_tool_calls

    assert encode_chat and normalize_messages and render_chat and load_tools and parse_tool_calls
    from minimind_scale.losses import causal_lm_loss, count_label_tokens  # the flat layout's module names
    from minimind_scale.models import build_model

    assert causal_lm_loss and count_label_tokens and build_model


def test_readme_is_a_front_door_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 15_500, f"README.md is {len(readme.encode())} bytes: move detail into docs/"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", readme))
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages and not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"
