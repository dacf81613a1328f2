"""The shape of the engine: one direction of imports, small modules, short hot paths.

A sample index moves down the layers (loader -> executors -> epoch spec -> pool,
fetch, queues), so no module of ``src/`` may import one that imports it back, lazily
or not (``if TYPE_CHECKING:`` blocks excepted: they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "lightning_threadsafe"

# The functions a sample or a batch goes through on every delivery (None: every function
# of the module but constructors).
HOT_PATH = {
    "_fetch.py": ["load_sample", "load_many", "_attempt"],
    "_worker.py": None,  # every function of the worker loop
    "_epoch.py": ["finish_batch", "BaseIterator.__next__", "BaseIterator._failed"],
    "_admission.py": None,
    "_exec_inline.py": None,
    "_exec_threads.py": ["ThreadIterator._admit", "ThreadIterator._next_item",
                         "ThreadIterator._next_threaded", "ThreadIterator._deliver"],
    "_exec_process.py": ["ProcessIterator._next_item"],
    "ready_buffer.py": None,
    "scheduler.py": None,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    for name in graph:  # a package's __init__ is not a dependency of its own modules
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state:
                cycle = dfs(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = dfs(n)
            if cycle:
                return cycle
    return None


def test_the_import_graph_of_src_has_no_cycle():
    graph = _graph()
    assert "lightning_threadsafe.loader" in graph  # the scan found the package
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_layers_never_import_the_loader():
    graph = _graph()
    for name, deps in graph.items():
        if name.split(".")[-1].startswith(("_exec", "_epoch", "_admission", "_handover",
                                           "_worker", "_fetch")) or ".tuning" in name:
            assert "lightning_threadsafe.loader" not in deps, name


def test_tuning_is_a_package_of_small_modules_and_autotune_is_gone():
    assert not (PKG / "autotune.py").exists()
    for path in (PKG / "tuning").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")


def test_no_function_on_the_per_sample_or_per_batch_path_is_over_50_lines():
    too_long = []
    for file, names in HOT_PATH.items():
        tree = ast.parse((PKG / file).read_text())
        for name, node in _functions(tree):
            if names is not None and name not in names:
                continue
            if names is None and name.endswith("__init__"):
                continue  # construction runs once per epoch, not per sample
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant):
                body = body[1:]  # the docstring is documentation, not path
            if body:
                lines = body[-1].end_lineno - body[0].lineno + 1  # type: ignore[operator]
                if lines > 50:
                    too_long.append(f"{file}:{name} ({lines} lines)")
    assert not too_long, too_long
