"""The import graph of ``vlp/`` has no circle (issue #32). An edge is every ``import`` in every module, at module
level or inside a function (a deferred import is still a dependency), except those under ``if TYPE_CHECKING:``.
Edges are read from the source (``ast``), so the check imports nothing."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlp"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The vlp modules ``name`` imports: ``from a.b import c`` counts ``a.b.c`` when that is a module, else ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "vlp")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != "vlp":
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_checker_reads_deferred_and_type_checking_imports():
    graph = import_graph()
    assert "vlp.objectives.base" in graph["vlp.config"]  # a deferred import inside a validator counts
    assert "vlp.config" not in graph["vlp.data.sources"]  # only under TYPE_CHECKING there


def test_no_import_circle_inside_vlp():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


# the rooms of the house (README, "Architecture"): module -> room, and the rooms each room may import
ROOMS = {
    "format": ("vlp.strict", "vlp.data.format"),
    "data": ("vlp.data.batch", "vlp.data.views", "vlp.data.transforms", "vlp.data.sources", "vlp.data"),
    "objectives": ("vlp.objectives",),
    "config": ("vlp.config", "vlp.schema", "vlp.eval.config"),
    "loader": ("vlp.data.mixing", "vlp.data.device_decode"),
    "checkpoint": ("vlp.checkpoint",),
    "models": ("vlp.models",),
    "task": ("vlp.task", "vlp.flops"),
    "eval": ("vlp.eval",),
    "export": ("vlp.export",),
    "shards": ("vlp.shards",),
    "trainer": ("vlp.train", "vlp.checkpointer", "vlp.optim", "vlp.train_log", "vlp.data_wait", "vlp.run_dir"),
    "cli": ("vlp.cli", "vlp.demo", "vlp.plot", "vlp"),
}
MAY_IMPORT = {
    "format": set(),
    "data": {"format"},
    "objectives": {"format", "data"},
    "config": {"format", "objectives"},  # objectives: the registry of their configs, inside the validators
    "loader": {"format", "data", "config"},
    "checkpoint": {"format", "config"},
    "models": {"format", "config", "checkpoint"},
    "task": {"format", "data", "objectives", "config", "loader", "checkpoint", "models"},
    "eval": {"format", "data", "objectives", "config", "checkpoint", "models"},
    "export": {"format", "data", "objectives", "config", "checkpoint", "models"},
    "shards": {"format"},
    "trainer": {"format", "data", "objectives", "config", "loader", "checkpoint", "models", "task", "eval"},
    "cli": set(ROOMS) - {"cli"},
}


def room_of(module: str) -> str:
    """The room of the longest prefix of ``module`` named in ROOMS."""
    best = max(((p, r) for r, prefixes in ROOMS.items() for p in prefixes
                if module == p or module.startswith(p + ".")), key=lambda pr: len(pr[0]), default=None)
    assert best is not None, f"{module} belongs to no room: add it to ROOMS (and README's Architecture)"
    return best[1]


def test_each_room_imports_only_the_rooms_below_it():
    bad = sorted(f"{m} -> {d} ({room_of(m)} may not import {room_of(d)})"
                 for m, deps in import_graph().items() for d in deps
                 if room_of(d) != room_of(m) and room_of(d) not in MAY_IMPORT[room_of(m)])
    assert not bad, "\n".join(bad)
    assert not circles({r: MAY_IMPORT[r] for r in ROOMS}), "the rooms themselves must form layers"
