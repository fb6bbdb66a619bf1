"""The house rules: which layer of kvpress_mm may import which, no import circles, pure tensor code.

The layers, bottom first, are :data:`LAYERS`; a module may import modules of its own layer and of
the layers below it, never above. Every ``import`` statement counts, also those inside functions
and under ``if TYPE_CHECKING:`` (a type-only reference upward is still a reader's wrong turn);
importing ``a.b.c`` counts as an edge to ``a.b.c`` only, not to the packages above it. The
built-in strategies and adapters are found by the registry at run time, like any plugin (a
module name, not an import).

docs/concepts.md shows the same table; :func:`test_the_docs_show_these_layers` keeps the two
in step.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvpress_mm"

#: The layers, bottom first: ``(name, module prefixes)``. A module belongs to the layer of its
#: longest matching prefix (``kvpress_mm.__init__`` is the package's own module).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("kvpress_mm.errors", "kvpress_mm.modality", "kvpress_mm.hookspecs")),
    ("ops", ("kvpress_mm.ops",)),
    ("cache", ("kvpress_mm.cache",)),
    ("adapters", ("kvpress_mm.adapters",)),
    ("registry", ("kvpress_mm.registry",)),
    ("session", ("kvpress_mm.session",)),
    ("public API", ("kvpress_mm.compressor", "kvpress_mm.__init__")),
    ("strategies", ("kvpress_mm.strategies", "kvpress_mm.wrappers")),
    ("apps", ("kvpress_mm.apps", "kvpress_mm.__main__")),
)

#: Layers whose code is pure tensor code: no transformers (portable to other engines).
PURE_TENSOR_LAYERS = ("foundation", "ops", "strategies")

#: Inside the apps: only the command line (and ``python -m kvpress_mm``) may import the command line.
COMMAND_LINE = "kvpress_mm.apps.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts)  # kvpress_mm/x/__init__.py -> kvpress_mm.x.__init__


def package_of(name: str) -> str:
    """``kvpress_mm.x.__init__`` -> ``kvpress_mm.x`` (what ``import kvpress_mm.x`` runs)."""
    return name.removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {package_of(module_name(path)): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every module the file ``path`` imports."""
    name = package_of(module_name(path))
    yield from imports_in(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)


def imports_in(source: str, name: str, is_package: bool, known: set[str]) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import of module ``name``'s ``source``.

    ``from a.b import c`` is an import of ``a.b.c`` when that is a module (in ``known``), else of ``a.b``.
    """
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                yield node.lineno, candidate if candidate in known else source


def layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            package = prefix.removesuffix(".__init__")
            matches = name == package if prefix != package else name == prefix or name.startswith(prefix + ".")
            if matches:
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        graph[name] = {target for _, target in imported_modules(path, known) if target in known and target != name}
    return graph


def test_every_module_belongs_to_a_layer() -> None:
    orphans = [name for name in modules() if layer_of(name) is None]
    assert not orphans, f"modules in no layer of LAYERS (add them to the table and to docs/concepts.md): {orphans}"


def test_no_layer_imports_a_higher_one() -> None:
    known = set(modules())
    wrong = []
    for name, path in modules().items():
        rank = layer_of(name)
        assert rank is not None
        for line, target in imported_modules(path, known):
            target_rank = layer_of(target) if target in known else None
            if target_rank is not None and target_rank > rank:
                where = f"{path.relative_to(ROOT)}:{line} ({LAYERS[rank][0]})"
                wrong.append(f"{where} imports {target} ({LAYERS[target_rank][0]})")
            if target.startswith(COMMAND_LINE) and not (name.startswith(COMMAND_LINE) or name == "kvpress_mm.__main__"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the command line ({target})")
    assert not wrong, "imports against the layer rule (docs/concepts.md):\n" + "\n".join(wrong)


def test_pure_tensor_layers_import_nothing_from_transformers() -> None:
    known = set(modules())
    pure = {rank for rank, (layer, _) in enumerate(LAYERS) if layer in PURE_TENSOR_LAYERS}
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path in modules().items()
        if layer_of(name) in pure
        for line, target in imported_modules(path, known)
        if target == "transformers" or target.startswith("transformers.")
    ]
    assert not wrong, "strategies and tensor code must not import transformers:\n" + "\n".join(wrong)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_there_are_no_import_circles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("importer", "is_package", "source", "expected"),
    [
        ("kvpress_mm.session.context", False, "from .state import state_of", "kvpress_mm.session.state"),
        ("kvpress_mm.session", True, "from .context import CompressionSession", "kvpress_mm.session.context"),
        ("kvpress_mm.apps.cli.demo", False, "from ..demo import run_demo", "kvpress_mm.apps.demo"),
        ("kvpress_mm.compressor", False, "from kvpress_mm.ops import views", "kvpress_mm.ops.views"),
        ("kvpress_mm.compressor", False, "from kvpress_mm.ops.views import LayerView", "kvpress_mm.ops.views"),
        ("kvpress_mm.compressor", False, "def f():\n    import kvpress_mm.apps.demo", "kvpress_mm.apps.demo"),
    ],
)
def test_imports_resolve_relative_submodule_and_nested_forms(
    importer: str, is_package: bool, source: str, expected: str
) -> None:
    targets = [target for _, target in imports_in(source, importer, is_package, set(modules()))]
    assert targets == [expected]


def test_the_docs_show_these_layers() -> None:
    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| ([^|]+?) \| ([^|]+?) \|", text, flags=re.MULTILINE)
    shown = [(name.strip(), tuple(re.findall(r"`([\w.]+)`", packages))) for _, name, packages in rows]
    expected = [(name, tuple(p.removesuffix(".__init__") for p in prefixes)) for name, prefixes in reversed(LAYERS)]
    assert shown == expected, "docs/concepts.md's layer table differs from tests/test_layers.py's LAYERS"
