"""The layers of the tree and the direction of their imports, read from the code itself (every import,
including those inside functions): a test fails on an import against the direction, and on any cycle.

    cli      -> anything                     (the one command line, on top)
    client   -> nothing of ours              (the Python client: httpx and the standard library only)
    service  -> core                         (the API; never the worker, never torch or Celery workers)
    worker   -> core, engine                 (runner, Celery app, embedded worker)
    core     -> engine                       (job domain; knows neither HTTP nor Celery)
    engine   -> nothing of ours              (pure torch + safetensors)

`python -m tests.test_architecture` prints who imports whom.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "adapter_merge"
FOLDERS = {"core": "core", "service": "service", "worker": "worker", "cli": "cli", "client": "client"}
"""Top-level folder -> its name under `adapter_merge`."""

ALLOWED_LAYERS = {
    "engine": set(),
    "core": {"engine"},
    "service": {"core"},
    "worker": {"core", "engine"},
    "cli": {"core", "engine", "service", "worker", "client"},
    "client": set(),
}
FORBIDDEN_LIBRARIES = {
    "engine": {"fastapi", "starlette", "uvicorn", "celery", "kombu", "redis", "pydantic", "httpx"},
    "core": {"fastapi", "starlette", "uvicorn", "celery", "kombu", "torch", "safetensors"},
    "service": {"torch", "safetensors"},
    "worker": {"fastapi", "starlette", "uvicorn"},
    "cli": set(),
    # Integrators install it beside their own code: no server frameworks, no torch, not even pydantic.
    "client": {"fastapi", "starlette", "uvicorn", "celery", "kombu", "redis", "torch", "safetensors", "pydantic"},
}


def module_files() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the package."""
    modules = {}
    for folder, name in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [PACKAGE, name, *path.relative_to(REPO / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> str:
    if module.startswith(f"{PACKAGE}.worker.engine"):
        return "engine"
    return module.split(".")[1]


def imports_of(module: str, path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Our modules -> the modules they import (ours, resolved to the longest known name; others as given)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imports_of(module, path):
            while name.startswith(PACKAGE + ".") and name not in files:
                name = name.rsplit(".", 1)[0]  # `from pkg.mod import name`: the module is pkg.mod
            targets.add(name)
        graph[module] = targets - {module}
    return graph


def test_imports_follow_the_layers() -> None:
    offences = []
    for module, targets in import_graph().items():
        layer = layer_of(module)
        for target in sorted(targets):
            if target.startswith(PACKAGE + "."):
                other = layer_of(target)
                if other != layer and other not in ALLOWED_LAYERS[layer]:
                    offences.append(f"{module} ({layer}) imports {target} ({other})")
            elif target.split(".")[0] in FORBIDDEN_LIBRARIES[layer]:
                offences.append(f"{module} ({layer}) imports {target}")
    assert not offences, "imports against the layering:\n" + "\n".join(offences)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(component) for component in found)


def test_the_checks_catch_offences() -> None:
    """The checks themselves work: a cycle and an upward import are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of(f"{PACKAGE}.worker.engine.plan") == "engine" and layer_of(f"{PACKAGE}.worker.runner") == "worker"
    assert "worker" not in ALLOWED_LAYERS["service"] and "service" not in ALLOWED_LAYERS["worker"]


def layer_matrix() -> dict[str, dict[str, int]]:
    """Layer -> imported layer -> number of module-level edges, for the README and the closing note."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for module, targets in import_graph().items():
        for target in targets:
            if target.startswith(PACKAGE + ".") and layer_of(target) != layer_of(module):
                counts[layer_of(module)][layer_of(target)] += 1
    return counts


if __name__ == "__main__":
    matrix = layer_matrix()
    for layer in ALLOWED_LAYERS:
        edges = ", ".join(f"{other} ({count})" for other, count in sorted(matrix.get(layer, {}).items()))
        print(f"{layer:8} imports {edges or 'nothing of ours'}")
    print(f"cycles: {cycles(import_graph()) or 'none'}")
