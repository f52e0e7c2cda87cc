"""moerge's modules and packages import each other without cycles.

A cycle leaves no order in which to read the code (or to import it: Python hands one side a
half-initialised module), so the import graph must be a DAG. The graph is read from the source
with ``ast``, nothing is imported:

* **Which files.** The packages listed in pyproject's ``[tool.setuptools] packages``, each found
  in its folder through ``package-dir``: ``moerge.coordinator`` lives in ``coordinator/``,
  ``moerge.v1`` in ``protos/moerge/v1/`` and so on.
* **What an import points to.** ``import a.b`` and ``from a import b`` point to the module
  ``a.b`` if there is one, else to ``a`` (``b`` is then a name inside it). The parent packages
  Python initialises on the way (``a``'s ``__init__``) are not edges: every module would
  otherwise depend on its package's ``__init__``, which imports the package's modules.
* **Which imports count.** Those that run when the module is imported: at module level, in
  class bodies and in ``try``/``if`` blocks. Not counted: imports under ``if TYPE_CHECKING:``
  (they never run; annotations only) and imports inside functions, which run on first call,
  after every module is loaded; the code uses them to defer heavy or optional dependencies
  (Flower, Opacus, boto3, gguf). A cycle through such an import still leaves a reader no order,
  so the packages in :data:`NO_LAZY_CYCLES`, which have none, are held to that stricter rule.
* **Packages.** Each top-level folder (with its subpackages) is one package; ``moerge/`` holds
  both the ground floor (``expert_format``, ``embedding``, ``errors``...) and the entry points
  (``cli``, ``client``), so each of its own modules is a node of its own.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parent.parent

#: Packages no cycle may pass through, even through imports inside functions. The others still
#: have such cycles: storage's blob-store factory imports its backends (boto3) on demand, and
#: contributor training its DP-SGD module (Opacus); the contributor CLIs call the SDK
#: (``moerge.client``), which uses the contributor library; ``moerge.demo`` and
#: ``moerge.llm_demo`` call each other.
NO_LAZY_CYCLES = ("moerge.coordinator", "moerge.router_training", "moerge.v1")

Graph = dict[str, set[str]]


def setuptools_config() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


#: Import name -> folder of each top-level package, e.g. "moerge.v1" -> "protos/moerge/v1".
FOLDERS: dict[str, str] = setuptools_config()["package-dir"]


def module_files() -> dict[str, Path]:
    """Import name -> source file of every module the distribution installs."""
    packages: list[str] = setuptools_config()["packages"]

    def folder(package: str) -> Path:
        top = max((p for p in FOLDERS if package == p or package.startswith(p + ".")), key=len)
        return ROOT / FOLDERS[top] / package[len(top) :].lstrip(".").replace(".", "/")

    files = {}
    for package in packages:
        files[package] = folder(package) / "__init__.py"
        for path in folder(package).glob("*.py"):
            name = f"{package}.{path.stem}"
            if path.stem != "__init__" and name not in packages:  # a package shadows a module
                files[name] = path
    return files


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_statements(body: list[ast.stmt], lazy: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports in ``body`` that run; with ``lazy``, those inside functions too."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if lazy:
                yield from import_statements(node.body, lazy)
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            yield from import_statements(node.orelse, lazy)
        else:  # class bodies, if/try/with/for/while/match blocks
            for field in ("body", "orelse", "finalbody"):
                yield from import_statements(getattr(node, field, []), lazy)
            for part in [*getattr(node, "handlers", []), *getattr(node, "cases", [])]:
                yield from import_statements(part.body, lazy)


def imported_names(
    node: ast.Import | ast.ImportFrom, importer: str, files: dict[str, Path]
) -> list[str]:
    """Module names ``node`` points to (see the module docstring), first-party or not."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1
        package = importer if files[importer].name == "__init__.py" else importer.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, *([base] if base else [])])
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]


def import_graph(lazy: bool) -> Graph:
    """Module -> the first-party modules it imports (see the module docstring)."""
    files = module_files()
    graph: Graph = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in import_statements(tree.body, lazy):
            for target in imported_names(node, name, files):
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def package_of(module: str) -> str:
    """The top-level folder's package holding ``module``; a module of moerge/ is its own."""
    for package in FOLDERS:
        if package != "moerge" and (module == package or module.startswith(package + ".")):
            return package
    return module


def folded(graph: Graph, group: Callable[[str], str]) -> Graph:
    """``graph`` with every node replaced by its group, edges inside a group dropped."""
    out: Graph = {group(n): set() for n in graph}
    for node, targets in graph.items():
        out[group(node)] |= {group(t) for t in targets} - {group(node)}
    return out


def cycle_through(graph: Graph, start: str) -> list[str] | None:
    """The shortest cycle ``start -> ... -> start`` in ``graph``, or None."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(graph[node]):
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if target not in parent:
                parent[target] = node
                queue.append(target)
    return None


def cycles(graph: Graph, starts: list[str]) -> list[str]:
    """One line per distinct cycle through any of ``starts``."""
    found: dict[frozenset[str], str] = {}
    for start in starts:
        cycle = cycle_through(graph, start)
        if cycle is not None:
            found.setdefault(frozenset(cycle), " -> ".join(cycle))
    return sorted(found.values())


def test_counted_imports_are_those_that_run_when_the_module_is_imported() -> None:
    source = """
        import a
        if TYPE_CHECKING:
            import b
        else:
            import c
        try:
            import d
        except ImportError:
            import e
        class K:
            import f
            def method(self):
                import g
        def function():
            import h
    """
    tree = ast.parse(textwrap.dedent(source))

    def counted(lazy: bool) -> list[str]:
        return sorted(node.names[0].name for node in import_statements(tree.body, lazy))

    assert counted(lazy=False) == ["a", "c", "d", "e", "f"]
    assert counted(lazy=True) == ["a", "c", "d", "e", "f", "g", "h"]


def test_cycles_are_reported_as_the_shortest_path_back() -> None:
    graph: Graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a", "b"}, "d": set()}
    assert cycles(graph, ["a", "d"]) == ["a -> b -> c -> a"]
    assert cycles(graph, ["b"]) == ["b -> c -> b"]


def test_every_first_party_import_names_a_module_file() -> None:
    files = module_files()
    unresolved = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in import_statements(tree.body, lazy=True):
            for target in imported_names(node, name, files):
                if target.split(".")[0] == "moerge" and target not in files:
                    unresolved.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target}")
    assert not unresolved, "imports that lead to no file:\n" + "\n".join(unresolved)


def test_no_module_is_in_an_import_cycle() -> None:
    graph = import_graph(lazy=False)
    assert len(graph) > 100  # the walk found the packages
    found = cycles(graph, sorted(graph))
    assert not found, "import cycles between modules:\n" + "\n".join(found)


def test_no_package_is_in_an_import_cycle() -> None:
    graph = folded(import_graph(lazy=False), package_of)
    assert set(FOLDERS) <= set(graph)
    found = cycles(graph, sorted(graph))
    assert not found, "import cycles between packages:\n" + "\n".join(found)


def test_server_and_routers_are_in_no_cycle_even_through_lazy_imports() -> None:
    graph = import_graph(lazy=True)
    found = []
    for nodes in (graph, folded(graph, package_of)):  # modules, then packages
        found += cycles(nodes, sorted(n for n in nodes if package_of(n) in NO_LAZY_CYCLES))
    assert not found, "cycles through imports inside functions:\n" + "\n".join(found)
