"""The package's shape, checked: imports go one way (no cycles, nothing imports a layer above it), and no module or
function outgrows what a reader takes in at once. Python's own ``ast``, nothing to install."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "visiontune"
# Lowest first. A module imports from lower layers, or from inside its own part (its top-level package or module).
LAYERS = [
    {"errors", "faults"},
    {"strategies", "meta"},
    {"config", "checkpoint"},
    {"runs", "caches"},
    {"data", "models"},
    {"metrics"},
    {"engine"},  # the loop: it never imports the pictures, the report, the tasks, inference, export or the CLI
    {"visualize"},
    {"report"},
    {"advisor"},
    {"tasks", "inference", "audit"},
    {"export", "compare"},
    {"benchmark"},
    {"quantize"},
    {"cli"},
    {"__main__", ""},  # "": the package's __init__, the public API
]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 80


def modules() -> dict[str, Path]:
    """Dotted names inside the package ("" for its __init__) -> files."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, at its top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("visiontune"):
                target = node.module.removeprefix("visiontune").lstrip(".")
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}".lstrip(".")
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("visiontune").lstrip(".") for a in node.names if a.name.startswith("visiontune")}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    top = name.split(".")[0]
    return next(i for i, members in enumerate(LAYERS) if top in members)


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)  # StopIteration names a module LAYERS forgets


def test_no_import_goes_up_or_across():
    wrong = [
        f"{a} imports {b}" for a, targets in graph().items() for b in targets if a.split(".")[0] != b.split(".")[0] and layer(b) >= layer(a)
    ]
    assert not wrong, wrong


def test_no_import_cycle():
    g, state, path = graph(), {}, []

    def visit(node):  # depth-first; a grey node met again closes a cycle
        state[node] = "grey"
        path.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == "grey":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "black"

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_modules_and_functions_stay_short():
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above would pass on an empty graph: show they catch what they are for."""
    for rel, text in {
        "__init__.py": "",
        "errors.py": "from .cli import main\n",
        "cli.py": "from .errors import UserError\n",
        "engine/__init__.py": "",
        "engine/loop.py": "from ..report import write_report\n",
        "report.py": "",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    g = graph()
    assert g["errors"] == {"cli"} and g["cli"] == {"errors"} and g["engine.loop"] == {"report"}
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "cli -> errors -> cli" in str(e)
    else:
        raise AssertionError("the cycle cli <-> errors was not found")
    try:
        test_no_import_goes_up_or_across()
    except AssertionError as e:
        assert "engine.loop imports report" in str(e) and "errors imports cli" in str(e)
    else:
        raise AssertionError("errors importing cli was not found")
