"""Package layering: no import cycles inside trb_jax, and reading a config stays light.

The import graph is read from the source (ast), not from a live interpreter, so an import
inside a function counts as much as one at the top of a module: a lazy import that exists
only to dodge a cycle is still a cycle in the design.
"""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "trb_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, pathlib.Path]:
    """Every module of the package (dotted name -> file); packages by their __init__.py."""
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import statements at any depth, except under `if TYPE_CHECKING:` (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        stack.extend(children)


def _resolve(name: str, modules: dict) -> str | None:
    """The package module `name` executes: itself, or its longest prefix that is a module
    (`trb_jax.sharding.constrain` -> `trb_jax.sharding`); None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the package modules its source imports (module- and function-level)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolved against the importing module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from mod import obj` the module.
                candidates = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for candidate in candidates:
                target = _resolve(candidate, modules)
                if target is not None and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_import_graph_sees_module_and_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from trb_jax.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from trb_jax.a import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trb_jax.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = import_graph(package_modules())
    assert graph["trb_jax.a"] == {"trb_jax.sub.b"}
    assert graph["trb_jax.sub.b"] == {"trb_jax.a"}
    assert graph["trb_jax.c"] == set()
    assert find_cycle(graph) == ["trb_jax.a", "trb_jax.sub.b", "trb_jax.a"]


def test_trb_jax_import_graph_has_no_cycle():
    graph = import_graph(package_modules())
    # The graph is real (a parser that saw nothing would pass vacuously).
    assert "trb_jax.sharding" in graph["trb_jax.models.qwen3"]
    assert "trb_jax.optim" in graph["trb_jax.config"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in trb_jax: " + " -> ".join(cycle)


def test_reading_a_config_does_not_import_the_train_step():
    code = ("import sys, trb_jax.config; "
            "print('trb_jax.train_step' in sys.modules, 'trb_jax.trainer' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = dict(zip(("train_step", "trainer"), result.stdout.split()))
    assert imported == {"train_step": "False", "trainer": "False"}, f"import trb_jax.config loads {imported}"
