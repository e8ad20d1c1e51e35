"""The floor plan's rules, read from the imports of every module (with `ast`, nothing runs):

- nothing under `workers/` imports `relay.ingress`: a worker runs without the HTTP API;
- nothing under `relay/` imports `workers`, except `relay/cli.py`, which wires the roles;
- nothing under `relay/` but the CLI imports `relay.ingress`: the core sits below it;
- no import cycles between the modules of `relay/` and `workers/` (counting the imports a
  module makes when it is loaded, not those inside functions or under `if TYPE_CHECKING:`).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "workers")
Graph = dict[str, set[str]]


def module_name(path: Path) -> str:
    """`relay/store/sql/__init__.py` -> `relay.store.sql`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    """Every module of the project's packages, by name."""
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _blocks(statement: ast.stmt) -> list[list[ast.stmt]]:
    """The statement lists inside a statement that run as the module loads (an
    `if TYPE_CHECKING:` body does not; a function's body runs only when called)."""
    if isinstance(statement, ast.If):
        if _is_type_checking(statement.test):
            return [statement.orelse]
        return [statement.body, statement.orelse]
    if isinstance(statement, ast.Try):
        handlers = [handler.body for handler in statement.handlers]
        return [statement.body, *handlers, statement.orelse, statement.finalbody]
    if isinstance(statement, ast.With | ast.AsyncWith | ast.ClassDef):
        return [statement.body]
    return []


def _load_time(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports among statements that run when the module loads."""
    for statement in statements:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            yield statement
        for block in _blocks(statement):
            yield from _load_time(block)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> Iterator[str]:
    """The modules an import statement names (a `from` import of a submodule names it)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if not is_package:
            package.pop()
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        yield submodule if submodule in known else base


def imports(load_time_only: bool) -> Graph:
    """Each module's imports of project modules: those made as it loads, or all of them."""
    modules = sources()
    known = set(modules)
    graph: Graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = (
            _load_time(tree.body)
            if load_time_only
            else (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))
        )
        is_package = path.name == "__init__.py"
        graph[module] = {
            target
            for node in nodes
            for target in _targets(node, module, is_package, known)
            if target in known and target != module
        }
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The import cycles a depth-first walk meets, each as `[a, b, ..., a]`."""
    found: list[list[str]] = []
    finished: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if child in path:
                found.append([*path[path.index(child) :], child])
            elif child not in finished:
                visit(child)
        path.pop()
        finished.add(node)

    for node in sorted(graph):
        if node not in finished:
            visit(node)
    return found


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports_of(target: str, allowed: Callable[[str], bool]) -> list[str]:
    """Every import of `target` (or of a module in it) by a module not `allowed` to."""
    return sorted(
        f"{module} imports {imported}"
        for module, imported_modules in imports(load_time_only=False).items()
        if not allowed(module)
        for imported in imported_modules
        if _inside(imported, target)
    )


def test_workers_do_not_import_the_ingress() -> None:
    offenders = imports_of("relay.ingress", lambda module: not _inside(module, "workers"))
    assert not offenders, "workers/ must not import relay.ingress:\n" + "\n".join(offenders)


def test_relay_imports_workers_only_in_the_cli() -> None:
    offenders = imports_of(
        "workers", lambda module: not _inside(module, "relay") or module == "relay.cli"
    )
    assert not offenders, "only relay/cli.py may import workers:\n" + "\n".join(offenders)


def test_the_core_does_not_import_the_ingress() -> None:
    offenders = imports_of(
        "relay.ingress",
        lambda module: (
            not _inside(module, "relay")
            or _inside(module, "relay.ingress")
            or module == "relay.cli"
        ),
    )
    assert not offenders, "only the CLI may import relay.ingress:\n" + "\n".join(offenders)


def test_no_import_cycles() -> None:
    found = cycles(imports(load_time_only=True))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_rules_see_the_imports() -> None:
    """The graph holds what the code imports (a reader that found nothing would pass)."""
    everything, at_load = imports(load_time_only=False), imports(load_time_only=True)
    assert "workers.bot.service" in everything["relay.cli"]
    assert "relay.pipeline.stage" in at_load["workers.delivery.worker"]
    assert "relay.store.sql.inbound" in at_load["relay.store.sql"]
    assert "relay.broker.queues" in at_load["relay.cli"]  # `from package import module`
    # Imported inside a function: seen by the rules, not by the cycle check.
    assert "workers.bot.adapters.botframework" in everything["workers.bot.adapters"]
    assert "workers.bot.adapters.botframework" not in at_load["workers.bot.adapters"]


def test_cycles_are_found_and_named() -> None:
    graph: Graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
