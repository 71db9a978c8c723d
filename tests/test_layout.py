"""The package keeps the layout docs/design.md describes: imports run one way.

The pure core imports nothing but the core; the actors are written against interfaces,
never against PostgreSQL, httpx or wsproto; only the commands that serve users import the
test kit; and no module imports, however indirectly, a module that imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stream_supervisor"

#: The pure domain core: values, decoding, order and position math. No I/O.
CORE = {"events", "protocol", "orders", "positions", "ledger", "backoff", "bounds",
        "strategy", "errors", "messages", "symbols", "activities", "budget", "revisions",
        "adjustments"}
#: The actors and their supervisor: written against interfaces only.
ACTORS = {"connection", "recovery", "dedupe", "writer", "supervisor", "fleet", "broker_events",
          "reconciler", "nontrade"}
#: Implementations of the interfaces, and what wires them together.
IMPLEMENTATIONS = {"pgstore", "pgconn", "rest_http", "wsclient", "endpoints", "sdnotify", "sse_http",
                   "embedded", "wiring", "service", "cli", "demo", "testing",
                   "pgfleet", "fleet_service"}
#: The user-facing commands that run on the test kit.
USES_TESTING = {"cli", "demo"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of the package `path` imports, at any depth of its code."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [f"{target}.{a.name}" for a in node.names]
            else:
                target, names = node.module or "", []
            candidates = [target, *names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c.split(".")[0] == "stream_supervisor")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from .x import y` names y, which may be a module or a name in x.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_core_imports_only_the_core() -> None:
    offenders = {
        name: sorted(t for t in targets if _top(t) not in CORE)
        for name, targets in _graph().items()
        if _top(name) in CORE and name.count(".") == 1
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_actors_never_import_an_implementation() -> None:
    offenders = {
        name: sorted(t for t in targets if _top(t) in IMPLEMENTATIONS)
        for name, targets in _graph().items()
        if _top(name) in ACTORS
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_user_commands_import_the_test_kit() -> None:
    offenders = sorted(
        name for name, targets in _graph().items()
        if not name.startswith("stream_supervisor.testing") and _top(name) not in USES_TESTING
        and any(t.startswith("stream_supervisor.testing") for t in targets)
    )
    assert offenders == []


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []
