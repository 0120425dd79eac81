"""The package's shape: no import cycles (function-level imports included), stages apart from backends,
modules of a size one can read, and the device runner's loader table in step with the backend registry."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "edgekit"
MAX_LINES = 470  # "~450": a module one can read in one sitting
# Longer than MAX_LINES because each is one cohesive thing (docs/architecture.md says why).
COHESIVE = {
    "edgekit/profiling/runner.py",  # copied alone to the device: standard library only, one file by design
    "edgekit/compress/onnx_to_torch.py",  # one converter: the op table and the module it builds
    "edgekit/packaging/archive.py",  # one format: written, verified and extracted under the same rules
}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (no runtime edge)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            out |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the edgekit modules it imports, at module level or inside functions. `from pkg import mod`
    is an edge to pkg.mod (the package's own __init__ runs for every submodule anyway)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                names = [a.name for a in node.names if f"{base}.{a.name}" not in mods]
                targets = subs + ([base] if names else [])
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check below must be able to fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk saw the package
    found = cycles(graph)
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) + "\n    " + "\n    ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found)


def test_modules_stay_readable() -> None:
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= COHESIVE, f"modules over {MAX_LINES} lines: {long} (split them, or say why in " \
                                  "docs/architecture.md and COHESIVE)"
    doc = (REPO / "docs" / "architecture.md").read_text()
    for path in COHESIVE:
        assert path in doc, f"docs/architecture.md does not say why {path} is one module"


BACKEND_NAMES = ("onnxruntime", "openvino", "ncnn", "tensorrt", "ort-mobile", "rknn", "litert", "executorch")


def test_backend_names_only_in_backends() -> None:
    """Outside backends/, code talks to the Backend protocol, never to a backend by name (the device runner is
    the exception: it runs alone on the device; its loader table is checked against the registry below)."""
    allowed = {PACKAGE / "profiling" / "runner.py"}
    offenders = []
    for f in PACKAGE.rglob("*.py"):
        if f in allowed or (PACKAGE / "backends") in f.parents:
            continue
        tree = ast.parse(f.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in BACKEND_NAMES and id(node) not in docstrings:
                offenders.append(f"{f.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offenders, "backend names outside backends/:\n" + "\n".join(offenders)


def test_device_runner_loads_every_registered_backend() -> None:
    from edgekit import backends

    sys.path.insert(0, str(PACKAGE / "profiling"))
    try:
        import runner
    finally:
        sys.path.pop(0)
    table = getattr(runner, "LOADERS", None)
    if table is None:
        pytest.fail("profiling/runner.py has no LOADERS table {backend name: loader}")
    assert set(table) == set(backends.names()), (sorted(table), backends.names())
