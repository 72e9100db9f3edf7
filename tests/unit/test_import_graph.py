"""No import cycles between the modules of ``secura_plugins``.

Every module is parsed with ``ast``; every ``import``/``from ... import`` counts, at the
top level, inside functions and under ``if TYPE_CHECKING:`` (a deferred import that
dodges a cycle is still a cycle). The package ``__init__``'s lazy PEP 562 table counts
too: ``secura_plugins.X`` resolved through ``__init__.__getattr__`` is an edge from
``__init__`` to the module that defines ``X``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import secura_plugins

PACKAGE = "secura_plugins"
ROOT = Path(secura_plugins.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _known(name: str, modules: set[str]) -> str | None:
    """The package module that ``name`` (a module or ``module.attribute``) lives in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its source)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module)
                # `from pkg import sub` is an edge to the submodule when there is one, else
                # to pkg (a parent package's own import is not counted, as usual).
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            elif isinstance(node, ast.Dict) and mod == PACKAGE:  # the PEP 562 _LAZY table
                for value in node.values:
                    if (
                        isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                        and value.value.startswith(".")
                    ):
                        targets.append(_resolve(mod, True, 1, value.value[1:]))
            for target in targets:
                if not target.startswith(PACKAGE):
                    continue
                found = _known(target, modules)
                # `from .pkg import name` is an edge to pkg.name if that is a module, else pkg.
                if found is not None and found != mod:
                    graph[mod].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    # The walk sees top-level, deferred (function-level) and TYPE_CHECKING imports.
    assert "secura_plugins.io" in graph["secura_plugins.model"]
    assert "secura_plugins.keep.interpolate" in graph["secura_plugins.model"]
    assert "secura_plugins.manager" in graph["secura_plugins.config"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_deferred_relative_import_cycle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from secura_plugins.c import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nx = 1\n"
    )
    cycle = find_cycle(import_graph(pkg))
    assert cycle == [f"{PACKAGE}.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.c", f"{PACKAGE}.a"]
