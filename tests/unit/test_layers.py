"""The import graph of src/batchd: layers import only layers below them, and nothing imports
in a circle. Read from the source with ``ast`` (every import, also those inside functions;
only ``if TYPE_CHECKING:`` blocks are skipped), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import batchd

SRC = Path(batchd.__file__).parent

# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    (
        "clock",
        "errors",
        "ids",
        "failpoints",
        "engine_activity",
        "metrics",
        "config",
        "loop_pacing",
        "toml_files",
    ),
    ("store", "blobs"),
    ("engines",),
    ("protocol", "costs"),
    ("inference",),
    ("scheduler",),
    ("service",),
    ("api",),
    ("runtime",),
    ("cli",),
]
LAYER_OF = {top: rank for rank, names in enumerate(LAYERS) for top in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Name | ast.Attribute)
        and ast.unparse(node.test).endswith("TYPE_CHECKING")
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The batchd modules ``path`` imports (``from batchd.x import y`` counts as batchd.x.y
    when that is a module, else batchd.x)."""
    found: set[str] = set()
    package = module_name(path).rpartition(".")[0] if path.name != "__init__.py" else None

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("batchd"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = (package or module_name(path)).split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            if base.startswith("batchd"):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    paths = [p for p in SRC.rglob("*.py") if "migrations" not in p.parts]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = sorted(m for m in graph() if m != "batchd" and layer(m) is None)
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_layers_import_only_layers_below_them() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if (lm := layer(module)) is not None and (lt := layer(target)) is not None and lt > lm
    )
    assert not upward, "\n".join(upward)


def test_the_store_imports_no_upper_layer() -> None:
    allowed = {"batchd.clock", "batchd.errors", "batchd.failpoints", "batchd.ids"}
    for module, targets in graph().items():
        if module.startswith("batchd.store"):
            outside = {t for t in targets if not t.startswith("batchd.store")} - allowed
            assert not outside, f"{module} imports {sorted(outside)}"


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
