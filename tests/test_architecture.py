"""The package's shape, read from its source with `ast`: no import cycle, imports only downward
through the layers, only dropbox_client.py imports the SDK, no over-long class or function and no
import hidden inside a function without a comment saying why.

A new module fails `test_every_module_has_a_layer` until it is added to LAYERS: the mapping is
the one place that says where each module belongs, so it must stay true."""

from __future__ import annotations

import ast
import io
import tokenize
from functools import lru_cache
from pathlib import Path

PACKAGE = "archive_dropbox"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

FOUNDATIONS, WORKBOOK, TRANSFER, ENGINES, COMMANDS = 1, 2, 3, 4, 5
LAYER_NAMES = {FOUNDATIONS: "foundations", WORKBOOK: "workbook/settings/journal",
               TRANSFER: "Dropbox client and transfer machinery", ENGINES: "engines", COMMANDS: "commands"}

# module -> layer. A module may import its own layer or lower ones, never a higher one.
LAYERS = {
    # Foundations: errors, units, local file operations, Dropbox path rules, hashing, logs,
    # the status line, the Windows console. They import nothing above them.
    "__init__": FOUNDATIONS,
    "errors": FOUNDATIONS,
    "units": FOUNDATIONS,
    "localfs": FOUNDATIONS,
    "names": FOUNDATIONS,
    "content_hash": FOUNDATIONS,
    "logs": FOUNDATIONS,
    "status": FOUNDATIONS,
    "winconsole": FOUNDATIONS,
    "requirements_check": FOUNDATIONS,
    "split": FOUNDATIONS,  # part plans, names and manifests of local files; knows nothing of Dropbox
    "zip_index": FOUNDATIONS,
    "inventory": FOUNDATIONS,
    # Workbook, settings and journal; cli is the run frame every script shares (flags,
    # settings, the run log, errors to exit codes), handed to the engines as RunContext.
    "sheets": WORKBOOK,
    "tabs": WORKBOOK,
    "workbooks": WORKBOOK,
    "settings": WORKBOOK,
    "journal": WORKBOOK,
    "plan_store": WORKBOOK,  # Stage 1's plan on disk (a scratch SQLite database)
    "cli": WORKBOOK,
    # The Dropbox client and the machinery the engines share: the login, the deletion gate,
    # Stage 1's plan and its look at the destinations,
    # job_setup (what every transfer job of app.py does before its first byte), transfer (one
    # retry and pause policy, the job runner) and source_check (is the local original unchanged).
    "dropbox_client": TRANSFER,
    "credentials": TRANSFER,
    "deletion": FOUNDATIONS,  # the gate: local file operations only (its proof takes a Dropbox snapshot as data)
    "prepare": TRANSFER,
    "plan_items": TRANSFER,  # a plan's files with their journal items, in pages (Stage 2 reads these)
    "destinations": TRANSFER,
    "job_setup": TRANSFER,
    "transfer": TRANSFER,
    "source_check": TRANSFER,
    # Engines, each with the modules it is made of (desktop_*, download_plan, deflate_zip).
    # They never parse arguments: each script's settings, flags and run are in its command module.
    # download uses joining's engine, joining uses zipping's search for 7-Zip.
    "api_upload": ENGINES,
    "upload_run": ENGINES,
    "upload_sessions": ENGINES,
    "upload_memory": ENGINES,
    "small_files": ENGINES,
    "commit_queue": ENGINES,
    "desktop_upload": ENGINES,
    "desktop_batches": ENGINES,
    "desktop_copy": ENGINES,
    "desktop_folder": ENGINES,
    "desktop_arrivals": ENGINES,
    "desktop_job": ENGINES,
    "download": ENGINES,
    "download_plan": ENGINES,
    "member_fetch": ENGINES,  # reading inside archives in Dropbox by ranges (download rows with a member)
    "find_files": ENGINES,
    "inventory_writer": ENGINES,  # the inventories an upload leaves beside its files in Dropbox
    "audit": ENGINES,
    "joining": ENGINES,
    "zipping": ENGINES,
    "deflate_zip": ENGINES,
    "scan": ENGINES,
    # Commands, one per script (settings, flags, run), and the launcher every script starts through.
    "app_runner": COMMANDS,
    "list_dir_cmd": COMMANDS,
    "join_files_cmd": COMMANDS,
    "zip_dir_cmd": COMMANDS,
    "start": COMMANDS,
}

LONG_CLASS_LINES = 400
LONG_FUNCTION_LINES = 80
EXCUSE = "long because"


def _modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE_DIR.glob("*.py"))


@lru_cache(maxsize=None)
def _source(module: str) -> str:
    return (PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    return ast.parse(_source(module), filename=f"{PACKAGE}/{module}.py")


@lru_cache(maxsize=None)
def _comments(module: str) -> dict[int, str]:
    """Line number -> the comment on it (tokenize: a '#' inside a string is not one)."""
    tokens = tokenize.generate_tokens(io.StringIO(_source(module)).readline)
    return {token.start[0]: token.string for token in tokens if token.type == tokenize.COMMENT}


def _imported_names(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """Full dotted names this import statement loads ("archive_dropbox.split", "dropbox.files")."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = f"{PACKAGE}.{node.module}" if node.module else PACKAGE
        if node.level > 1:
            raise AssertionError(f"{module}.py line {node.lineno}: import from above the package")
    else:
        base = node.module or ""
    # `from . import split` and `from archive_dropbox import split` load the module split.
    return [f"{base}.{alias.name}" for alias in node.names] if base == PACKAGE else [base]


def _package_imports(module: str) -> dict[str, int]:
    """Sibling module -> first line importing it, from every import statement anywhere in the
    module: inside functions and `if TYPE_CHECKING:` blocks too (a hidden import is still a
    dependency)."""
    found: dict[str, int] = {}
    for node in ast.walk(_tree(module)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in _imported_names(node, module):
                parts = name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in _modules():
                    found.setdefault(parts[1], node.lineno)
    return found


def _import_graph() -> dict[str, dict[str, int]]:
    return {module: _package_imports(module) for module in _modules()}


def _find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a self-import),
    as a closed path a -> b -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the package is small, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    return paths[node] + [start]
                if target in component and target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a strongly connected set


def _describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_sees_imports_inside_functions_and_finds_cycles():
    # The checks below are only as good as this reader: a known function-level import must be
    # in the graph, and a planted cycle must be found and named.
    assert "sheets" in _package_imports("scan")
    assert "split" in _package_imports("joining")
    hidden = ast.parse("def f():\n    from .b import x\n")
    assert [_imported_names(n, "a") for n in ast.walk(hidden) if isinstance(n, ast.ImportFrom)] == [
        [f"{PACKAGE}.b"]]
    assert _find_cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c", "a"]]
    assert _find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycle():
    graph = _import_graph()
    cycles = [_describe_cycle(graph, cycle) for cycle in _find_cycles(graph)]
    assert not cycles, "import cycles among archive_dropbox modules:\n  " + "\n  ".join(cycles)


def test_every_module_has_a_layer():
    modules = set(_modules())
    unknown = sorted(modules - set(LAYERS))
    gone = sorted(set(LAYERS) - modules)
    assert not unknown, (f"modules missing from LAYERS in {Path(__file__).name}: {', '.join(unknown)}; "
                         "add each with the layer it belongs to")
    assert not gone, f"LAYERS names modules that no longer exist: {', '.join(gone)}; remove them"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, imports in _import_graph().items():
        if module not in LAYERS:
            continue  # reported by test_every_module_has_a_layer
        for target, line in sorted(imports.items()):
            if target in LAYERS and LAYERS[target] > LAYERS[module]:
                upward.append(f"{module}.py line {line} ({LAYER_NAMES[LAYERS[module]]}) imports {target} "
                              f"({LAYER_NAMES[LAYERS[target]]})")
    assert not upward, "imports going up the layers:\n  " + "\n  ".join(upward)


def test_only_dropbox_client_imports_the_sdk():
    offenders = []
    for module in _modules():
        if module == "dropbox_client":
            continue
        for node in ast.walk(_tree(module)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported_names(node, module):
                    if name.split(".")[0] == "dropbox":
                        offenders.append(f"{module}.py line {node.lineno}: {name}")
    assert not offenders, "only dropbox_client.py may import the dropbox SDK:\n  " + "\n  ".join(offenders)


def _definitions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every class and function, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _definitions(node, f"{name}.")
        else:
            yield from _definitions(node, prefix)


def _excused(module: str, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A comment saying "long because" on the line above the definition (above its decorators),
    on its signature, or before or on the first line of its body."""
    comments = _comments(module)
    first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
    lines = [first - 1, *range(first, node.body[0].lineno + 1)]
    return any(EXCUSE in comments.get(line, "").lower() for line in lines)


def test_no_overlong_class_or_function():
    too_long = []
    for module in _modules():
        for name, node in _definitions(_tree(module)):
            limit = LONG_CLASS_LINES if isinstance(node, ast.ClassDef) else LONG_FUNCTION_LINES
            length = node.end_lineno - node.lineno + 1
            if length > limit and not _excused(module, node):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                too_long.append(f"{module}.py line {node.lineno}: {kind} {name} has {length} lines (limit {limit})")
    assert not too_long, (f"split these, or say why on the line above the def/class with a comment "
                          f"containing '{EXCUSE}':\n  " + "\n  ".join(too_long))


def test_imports_inside_functions_say_why():
    unexplained = []
    for module in _modules():
        comments = _comments(module)
        inside: dict[int, tuple[str, ast.stmt]] = {}  # line -> (innermost function, import)
        for name, function in _definitions(_tree(module)):
            if not isinstance(function, ast.ClassDef):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        inside[node.lineno] = (name, node)
        for line, (name, node) in sorted(inside.items()):
            if not any(number in comments for number in range(line - 1, node.end_lineno + 1)):
                unexplained.append(f"{module}.py line {line} in {name}: {ast.unparse(node)}")
    assert not unexplained, ("imports inside functions need a comment on that line or the line above "
                             "saying why (start-up time, a platform-only module, ...):\n  "
                             + "\n  ".join(unexplained))
