"""The package's layout holds: imports go one way, down LAYERS, and no two units import each
other, however indirectly. Every import counts, at module level, inside functions and under
TYPE_CHECKING alike (an import in a function keeps a heavy dependency lazy; it does not make
a cycle or an upward import acceptable)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnistflow import config
from mnistflow.lifecycle import networks

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mnistflow"

# Units bottom to top, as the packages' docstrings say: a unit (a subpackage, or a top-level
# module) may import units of lower tiers only; units of one tier do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("mnistflow", "config"),  # the package itself: __version__
    ("store",),
    ("data", "reporting", "reports"),
    ("lifecycle",),
    ("spool", "inference", "stack"),
    ("tracking", "engines", "serving"),
    ("recording",),
    ("runs",),
    ("pipeline", "sweep"),
    ("cli",),
    ("__main__",),
]
TIER = {unit: tier for tier, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """mnistflow.lifecycle.registry -> lifecycle; mnistflow.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every mnistflow module path imports, relative imports resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mnistflow":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "mnistflow":
                continue
            for alias in node.names:
                # `from mnistflow import data`: the module is the name; else it is base.
                yield node.lineno, f"{base}.{alias.name}" if base == "mnistflow" else base


def unit_imports() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ["path:line", ...]}, without a unit's imports of itself."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(module_name(path))
        edges = graph.setdefault(unit, {})
        for line, target in imported(path):
            other = unit_of(target)
            if other != unit:
                where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                edges.setdefault(other, []).append(where)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(unit: str) -> None:
        index[unit] = low[unit] = len(index)
        stack.append(unit)
        for other in graph.get(unit, {}):
            if other not in index:
                visit(other)
                low[unit] = min(low[unit], low[other])
            elif other in stack:
                low[unit] = min(low[unit], index[other])
        if low[unit] == index[unit]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == unit:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for unit in sorted(graph):
        if unit not in index:
            visit(unit)
    return found


def test_every_unit_has_a_place_in_the_layers():
    assert sorted(set(unit_imports()) - set(TIER)) == []


def test_no_cycle_between_units():
    graph = unit_imports()
    described = [
        " -> ".join(component)
        + ": "
        + "; ".join(
            f"{a} imports {b} ({', '.join(graph[a][b])})"
            for a in component
            for b in component
            if b in graph[a]
        )
        for component in cycles(graph)
    ]
    assert described == []


def test_imports_go_down_the_layers():
    upward = [
        f"{unit} (tier {TIER[unit]}) imports {other} (tier {TIER[other]}) at {', '.join(where)}"
        for unit, edges in unit_imports().items()
        for other, where in edges.items()
        if unit in TIER and other in TIER and TIER[other] >= TIER[unit]
    ]
    assert upward == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}, [["a", "b", "c"]]),
        ({"a": {"b": []}, "b": {}}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def test_config_names_every_network():
    """config lists the architectures (so that checking a config needs no torch); the
    networks module builds exactly those."""
    assert tuple(networks.ARCHITECTURES) == config.ARCHITECTURES
