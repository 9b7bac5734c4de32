"""The package's layers: imports only go down, no cycles, no private names across modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nnobs"

# Lower numbers sit lower. A module may import its own subpackage and any lower layer;
# subpackages on the same layer are independent of each other.
LAYERS = {
    "core": 0,
    "data": 1,
    "measure": 1,
    "models": 2,
    "training": 3,
    "observe": 4,
    "interventions": 5,
    # One subpackage per method family; each may use interventions and everything below.
    "circuits": 6,
    "routing": 6,
    "seeding": 6,
    "features": 6,
    "report": 7,
    "cli": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every nnobs import, at any depth in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "nnobs" or node.module.startswith("nnobs."):
                found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "nnobs" or alias.name.startswith("nnobs."):
                    found.append((alias.name, [], node.lineno))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# The top-level package re-exports the public API and runs the CLI: it sits above every layer.
TOP = {"nnobs", "nnobs.__main__"}


def resolve(module: str, names: list[str]) -> list[str]:
    """The modules an import statement loads (``from nnobs.measure import stats`` → stats)."""
    targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return targets or [module]


def test_every_module_belongs_to_a_layer():
    orphans = [m for m in MODULES if m not in TOP and layer_of(m) not in LAYERS]
    assert not orphans, f"modules outside the layers {sorted(LAYERS)}: {orphans}"


def test_imports_only_go_down():
    upward = []
    for module, path in MODULES.items():
        if module in TOP:
            continue
        here = layer_of(module)
        for imported, names, line in imports_of(path):
            for target in resolve(imported, names):
                there = layer_of(target)
                if there is None:
                    upward.append(f"{module}:{line} imports the top-level package")
                elif there != here and LAYERS[there] >= LAYERS[here]:
                    upward.append(f"{module}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_no_private_names_cross_modules():
    private = [
        f"{module}:{line} imports {name} from {imported}"
        for module, path in MODULES.items()
        for imported, names, line in imports_of(path)
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert not private, "\n".join(private)


def test_no_import_cycles():
    graph = {
        module: {
            target
            for imported, names, _ in imports_of(path)
            for target in resolve(imported, names)
            if target in MODULES and target != module
        }
        for module, path in MODULES.items()
        if module not in TOP
    }
    # A package's __init__ importing its own modules is how a package exposes them, not a cycle.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_and_functions_stay_readable():
    """Modules of at most 500 lines and functions of at most 80: split them by idea."""
    too_long = []
    for module, path in MODULES.items():
        text = path.read_text()
        if (lines := len(text.splitlines())) > 500:
            too_long.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and (length := node.end_lineno - node.lineno + 1) > 80:
                too_long.append(f"{module}.{node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
