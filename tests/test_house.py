"""The house rules of berg_jax/, checked on its source (no imports run, fast).

- no import circles between berg_jax's modules (every import counts, also those inside
  functions: a lazy import only hides a circle until the day it is imported at the top);
- no module imports another module's private names (`from berg_jax.x import _name`, or
  `from berg_jax import x` then `x._name`);
- nothing below the command line imports it, and its verbs do not import each other
  (what they share is in `berg_jax.cli.common`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "berg_jax"


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in berg_jax (a package is its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every berg_jax import in one module."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "berg_jax":
                    out.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "berg_jax":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from berg_jax import head`: the module head
                    out.append((submodule, None, node.lineno))
                else:
                    out.append((source, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            while target not in modules:  # `import berg_jax.x.y` of a name, not a module
                target = target.rpartition(".")[0]
            if target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_module_and_their_imports():
    graph = _graph()
    assert {"berg_jax", "berg_jax.cli", "berg_jax.cli.encode", "berg_jax.writer", "berg_jax.atomic"} <= set(graph)
    assert "berg_jax.atomic" in graph["berg_jax.writer"]
    assert "berg_jax.head" in graph["berg_jax.fused"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for source, imported, line in _imports(name, path, modules):
            if imported and imported.startswith("_") and not imported.startswith("__") and source != name:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: from {source} import {imported}")
    assert bad == []


def test_no_module_reaches_into_another_modules_private_names():
    """`from berg_jax import writer` then `writer._name`: the same thing by another road."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        bound = {}  # local name -> berg_jax module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    source = node.module or ""
                    if f"{source}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and bound[node.value.id] != name
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert bad == []


def test_nothing_below_the_cli_imports_it_and_verbs_do_not_import_each_other():
    graph = _graph()
    for name, targets in graph.items():
        cli_targets = {t for t in targets if t == "berg_jax.cli" or t.startswith("berg_jax.cli.")}
        if not (name == "berg_jax.cli" or name.startswith("berg_jax.cli.")):
            assert not cli_targets, f"{name} imports the command line: {sorted(cli_targets)}"
        elif name not in ("berg_jax.cli", "berg_jax.cli.__main__"):
            assert cli_targets <= {"berg_jax.cli.common"}, f"{name} imports {sorted(cli_targets)}"
