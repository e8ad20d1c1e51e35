"""The floor plan's rules, read from the source of every module (with `ast`, nothing runs):

- nothing under `workers/` imports `relay.ingress`: a worker runs without the HTTP API;
- nothing under `relay/` imports `workers`, except the CLI (`relay.commands`), which wires
  the roles; in particular the pipeline (`relay.pipeline`) never calls up into the workers:
  each stage is a handler it is given;
- nothing under `relay/` but the CLI imports `relay.ingress`: the core sits below it;
- no import cycles between the modules of `relay/` and `workers/` (counting the imports a
  module makes when it is loaded, not those inside functions or under `if TYPE_CHECKING:`);
- no module imports a private name (`_name`) from another module: what a module shares it
  names without the underscore;
- the root of `relay/` holds only what the parts share: each of its modules is used by at
  least two parts (`relay.<package>`, `workers.<package>`); what one part alone uses lives
  in that part;
- no class is over `CLASS_LIMIT` code lines (blank lines, comment-only lines and docstrings
  not counted): a class that grows past it is split into parts it receives.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "workers")
CLI = "relay.commands"  # the command line
CLASS_LIMIT = 150
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


def _in_cli(module: str) -> bool:
    return _inside(module, CLI)


def test_relay_imports_workers_only_in_the_cli() -> None:
    """The pipeline included: it calls the stage handlers it is given, never `workers`."""
    offenders = imports_of(
        "workers", lambda module: not _inside(module, "relay") or _in_cli(module)
    )
    assert not offenders, "only the CLI may import workers:\n" + "\n".join(offenders)


def test_the_core_does_not_import_the_ingress() -> None:
    offenders = imports_of(
        "relay.ingress",
        lambda module: (
            not _inside(module, "relay") or _inside(module, "relay.ingress") or _in_cli(module)
        ),
    )
    assert not offenders, "only the CLI may import relay.ingress:\n" + "\n".join(offenders)


def test_no_import_cycles() -> None:
    found = cycles(imports(load_time_only=True))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_rules_see_the_imports() -> None:
    """The graph holds what the code imports (a reader that found nothing would pass)."""
    everything, at_load = imports(load_time_only=False), imports(load_time_only=True)
    cli = [module for module in everything if _in_cli(module)]
    assert any("workers.bot.service" in everything[module] for module in cli)
    assert "relay.pipeline.stage" in at_load["workers.delivery.worker"]
    assert "relay.store.sql.inbound" in at_load["relay.store.sql"]
    # Imported inside a function: seen by the rules, not by the cycle check.
    assert "workers.bot.adapters.botframework" in everything["workers.bot.adapters"]
    assert "workers.bot.adapters.botframework" not in at_load["workers.bot.adapters"]


def test_cycles_are_found_and_named() -> None:
    graph: Graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_from_import_of_a_submodule_names_the_submodule() -> None:
    (node,) = ast.parse("from relay.broker import queues, Broker").body
    assert isinstance(node, ast.ImportFrom)
    named = set(
        _targets(node, "relay.commands.main", False, {"relay.broker", "relay.broker.queues"})
    )
    assert named == {"relay.broker.queues", "relay.broker"}


def part_of(module: str) -> str | None:
    """The part a module belongs to (`relay.pipeline`, `workers.bot`); None for a module
    in the root of `relay/` (or `relay` itself)."""
    names = module.split(".")
    return ".".join(names[:2]) if len(names) > 2 or names[0] == "workers" else None


def root_modules_used_by_one_part() -> list[str]:
    """The modules in the root of `relay/` that fewer than two parts import."""
    graph = imports(load_time_only=False)
    lonely: list[str] = []
    for module, path in sources().items():
        if path.parent != ROOT / "relay" or path.name == "__init__.py":
            continue
        users = {part_of(user) for user, imported in graph.items() if module in imported}
        users.discard(None)
        if len(users) < 2:
            lonely.append(f"{module} (used by {', '.join(sorted(map(str, users))) or 'nothing'})")
    return lonely


def test_the_root_of_relay_holds_only_what_parts_share() -> None:
    lonely = root_modules_used_by_one_part()
    assert not lonely, "modules of relay/'s root that one part alone uses:\n" + "\n".join(lonely)


def test_parts_are_named_by_their_package() -> None:
    assert part_of("relay.pipeline.stage") == "relay.pipeline"
    assert part_of("relay.store.sql.inbound") == "relay.store"
    assert part_of("workers.bot.worker") == "workers.bot"
    assert part_of("relay.settings") is None


def private_imports() -> list[str]:
    """Every `from module import _name` of another project module's private name."""
    modules = sources()
    known = set(modules)
    return sorted(
        found
        for module, path in modules.items()
        for found in privates_taken(
            ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py", known
        )
    )


def privates_taken(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The private names a module's `from` imports take from other project modules."""
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        targets = set(_targets(node, module, is_package, known)) & known
        for alias in node.names:
            if _private(alias.name) and targets - {module}:
                source = "." * node.level + (node.module or "")
                found.append(f"{module} imports {alias.name} from {source}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_private_imports_are_found() -> None:
    tree = ast.parse(
        "from relay.a import _hidden, shown, __version__\n"
        "from . import _sibling\n"
        "from os import _exit\n"
        "def f():\n    from relay.a import _late\n"
    )
    known = {"relay.a", "relay.b", "relay"}
    assert privates_taken(tree, "relay.b", False, known) == [
        "relay.b imports _hidden from relay.a",
        "relay.b imports _sibling from .",
        "relay.b imports _late from relay.a",
    ]


def test_no_module_imports_another_modules_private_names() -> None:
    found = private_imports()
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def code_lines(source: str) -> set[int]:
    """The numbers of the lines that hold code: not blank, not only a comment, not a
    docstring (of the module, a class or a function)."""
    lines: set[int] = set()
    ignored = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT}
    ignored |= {tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in ignored:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstring_lines(ast.parse(source))


def docstring_lines(tree: ast.Module) -> set[int]:
    """The lines of every docstring in the tree."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0] if node.body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            found.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return found


def class_sizes(source: str) -> dict[str, int]:
    """Each class's code lines (nested classes by their dotted name, counted in both)."""
    code = code_lines(source)
    sizes: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}"
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                last = child.end_lineno or child.lineno
                sizes[name] = sum(1 for line in code if first <= line <= last)
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return sizes


def test_no_class_is_over_the_limit() -> None:
    over = sorted(
        f"{module}.{name}: {size} code lines"
        for module, path in sources().items()
        for name, size in class_sizes(path.read_text()).items()
        if size > CLASS_LIMIT
    )
    assert not over, f"classes over {CLASS_LIMIT} code lines:\n" + "\n".join(over)


def test_class_size_counts_code_only() -> None:
    source = '''
@decorated
class Small:
    """A docstring
    over two lines."""

    # a comment
    x = 1  # a trailing comment

    def method(self) -> str:
        """Its docstring."""
        return """a string
        that is code"""
'''
    assert class_sizes(source) == {"Small": 6}
