"""The house has one direction of dependencies (README, "Layout"): every import of every project module,
function-local ones included, points to a lower layer or within its own package, and no two modules
import each other, directly or through others.

The layers, lowest first (a package may import only the packages listed for it)::

    golden        recorded reference data (package data; imports nothing)
    effdet_torch  the model library
    converters    official formats <-> state dicts
    fixtures      synthetic official checkpoints / COCO data (test fixtures, not product code)
    parity        rules, goldens, compare / record / visualize
    evaluation    COCO data and the evaluation loop
    export        ONNX / torch.export / back to the official formats
    training      the official training recipe
    effdet_cli    the console scripts; nothing imports it

Expected values here are the layering rules themselves (first principles), not the code's own output;
``test_detects_*`` show that the walker does see an upward import and a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "golden": set(),
    "effdet_torch": set(),
    "converters": {"effdet_torch"},
    "fixtures": {"effdet_torch", "converters", "golden"},
    "parity": {"effdet_torch", "converters", "golden"},
    "evaluation": {"effdet_torch", "converters", "parity"},
    "export": {"effdet_torch", "converters"},
    "training": {"effdet_torch", "converters", "parity", "evaluation"},
    "effdet_cli": {"golden", "effdet_torch", "converters", "fixtures", "parity", "evaluation", "export", "training"},
}
PACKAGES = set(ALLOWED)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every imported module name (absolute, relative ones resolved) with its line, anywhere in the file.

    ``from X import Y`` yields ``X.Y`` too, because Y may be a submodule of X.
    """
    out: list[tuple[str, int]] = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            out += [(f"{name}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def project_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> imported project modules, and one message per import that points to a layer not allowed."""
    files = {module_name(p, root): p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    upward: dict[tuple[str, int], str] = {}
    for mod, path in sorted(files.items()):
        src_pkg = mod.split(".")[0]
        for name, line in imports_of(path.read_text(encoding="utf-8"), mod, path.name == "__init__.py"):
            dst_pkg = name.split(".")[0]
            if dst_pkg not in PACKAGES:
                continue
            if dst_pkg != src_pkg and dst_pkg not in ALLOWED[src_pkg]:
                where = f"{path.relative_to(root)}:{line}"
                upward.setdefault((where, line), f"{where}: {src_pkg} imports {name}")
            # the longest prefix that is a module of ours is the import's target
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                target = ".".join(parts[:n])
                if target in files:
                    if target != mod:
                        graph[mod].add(target)
                    break
    return graph, list(upward.values())


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer():
    top = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in ("tests", "benchmarks")}
    assert top <= PACKAGES, f"packages without a layer in tests/test_layering.py: {sorted(top - PACKAGES)}"
    assert PACKAGES - {"golden"} <= top


def test_no_upward_import():
    _, upward = project_graph(ROOT)
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph, _ = project_graph(ROOT)
    found = cycles(graph)
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_detects_a_function_local_upward_import(tmp_path):
    _write(tmp_path, {"effdet_torch/__init__.py": "", "converters/__init__.py": "",
                      "effdet_torch/model.py": "def f():\n    from converters.convert import x\n",
                      "converters/convert.py": "x = 1\n"})
    _, upward = project_graph(tmp_path)
    assert upward == ["effdet_torch/model.py:2: effdet_torch imports converters.convert"]


def test_detects_a_cycle_through_relative_imports(tmp_path):
    _write(tmp_path, {"parity/__init__.py": "", "parity/a.py": "from .b import y\nx = 1\n",
                      "parity/b.py": "def g():\n    from . import c\n", "parity/c.py": "from parity.a import x\n"})
    graph, upward = project_graph(tmp_path)
    assert not upward
    assert cycles(graph) == [["parity.a", "parity.b", "parity.c"]]


@pytest.mark.parametrize("package", sorted(PACKAGES - {"effdet_cli"}))
def test_nothing_imports_the_cli_layer(package):
    assert "effdet_cli" not in ALLOWED[package]
