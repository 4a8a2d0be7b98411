"""The package's imports go one way: no cycles, no library module importing the CLI, layers in order; and
no source file grows past 500 lines without saying why.

Read from the source with ``ast`` (nothing is imported); the module list is the real package (every ``.py``
under src/ropekit), and LAYERS may name only modules that exist. Every ``import`` counts, also inside
functions (a function-level import is still a dependency). Imports under ``if TYPE_CHECKING:`` (type hints
only) are kept apart: they count for cycles (a circle through type hints is still a circle: the modules
cannot be understood, split or moved one without the other) but not for layers (a type hint may name a
class from a layer above). A package ``__init__`` is a module of its own (``ropekit.kernels``); importing
``a.b.c`` depends on ``a.b.c`` only.

Layers, lowest first; a module may import its own layer and those below it, never one above (LAYERS below
is the authority):

    core (config, methods, gguf, warn)  <  reference (rotation, float64)  <  kernels (cpu, triton_rope, ops)
    <  dispatch (kernels.dispatch and the kernels package that re-exports it)  <  module (RotaryEmbedding,
    multimodal, and the ropekit package)  <  integration (hf, output)  <  applications (evaluation,
    training, search, analysis, kernels.bench)  <  cli (commands, cli)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ropekit"

# (layer name, module names). A name covers the module and everything under it; "=name" covers that module
# only (a package __init__ whose submodules sit on other layers). The longest match decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # hf.config_map / hf.config_probe: the transformers config translation RopeConfig.from_hf calls (no
    # ropekit.hf integration module imported), so on the core's layer although they live under hf/.
    ("core", ("ropekit.config", "ropekit.layered", "ropekit.methods", "ropekit.gguf", "ropekit.warn",
              "ropekit.hf.config_map", "ropekit.hf.config_probe")),
    ("reference", ("ropekit.rotation",)),
    ("kernels", ("ropekit.kernels.cpu", "ropekit.kernels.triton_rope", "ropekit.kernels.ops")),
    ("dispatch", ("ropekit.kernels.dispatch", "=ropekit.kernels")),
    ("module", ("ropekit.module", "ropekit.multimodal", "=ropekit")),
    ("integration", ("ropekit.hf", "ropekit.output", "ropekit.shipped")),
    ("applications", ("ropekit.evaluation", "ropekit.training", "ropekit.study", "ropekit.search",
                      "ropekit.analysis", "ropekit.kernels.bench")),
    ("cli", ("ropekit.cli", "ropekit.commands")),
]
CLI_PREFIXES = ("ropekit.cli", "ropekit.commands")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(name: str, path: Path, modules: dict[str, Path], type_only: bool = False) -> set[str]:
    """The package modules ``name`` (at ``path``) imports at run time (TYPE_CHECKING blocks left out), or with
    ``type_only`` those it imports under ``if TYPE_CHECKING:`` only."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    typed: set[str] = set()

    def resolve(target: str) -> str | None:
        # The module itself, else its closest enclosing package that exists (``ropekit.kernels.x.y`` -> ...).
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, found: set[str] = found) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, typed)
            for child in node.orelse:
                visit(child, found)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == PACKAGE:
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    found.add(sub if sub in modules else resolve(source))
        for child in ast.iter_child_nodes(node):
            visit(child, found)

    visit(ast.parse(path.read_text(), filename=str(path)))
    result = (typed - found) if type_only else found
    result.discard(None)
    result.discard(name)
    return result


def _graph() -> dict[str, set[str]]:
    """Run-time imports: what the layer checks read."""
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _type_only_graph() -> dict[str, set[str]]:
    """Imports under ``if TYPE_CHECKING:`` only (not also made at run time)."""
    modules = _modules()
    return {name: _imported(name, path, modules, type_only=True) for name, path in modules.items()}


def _full_graph() -> dict[str, set[str]]:
    """Every import, type-only ones included: what the cycle check reads."""
    graph, typed = _graph(), _type_only_graph()
    return {name: graph[name] | typed[name] for name in graph}


def _layer(name: str) -> int | None:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix.startswith("=")
            prefix = prefix.lstrip("=")
            covers = name == prefix or (not exact and name.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = sorted(w for w in graph[path[-1]] if w in members)[0]
            if nxt in seen:
                path = path[path.index(nxt):] + [nxt]
                break
            path.append(nxt)
            seen.add(nxt)
        cycles.append(path)
    return cycles


def test_the_scanner_sees_the_imports_it_must(tmp_path):
    """The checks below are only as good as the graph: known edges must be in it, type-hint imports not."""
    graph = _graph()
    assert "ropekit.methods" in graph["ropekit.config"]
    assert "ropekit.methods.registry" in graph["ropekit.methods.yarn"]
    assert "ropekit.rotation" in graph["ropekit.kernels.cpu"]
    assert "ropekit.rotation" not in _type_only_graph()["ropekit.kernels.cpu"]  # a run-time import
    # Under TYPE_CHECKING only: out of the run-time graph, in the type-only one (the cycle check counts it).
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom ropekit import rotation\nif TYPE_CHECKING:\n"
                      "    from ropekit.config import RopeConfig\n    from ropekit import rotation\n")
    known = {"ropekit.config": source, "ropekit.rotation": source, "ropekit.m": source}
    assert _imported("ropekit.m", source, known) == {"ropekit.rotation"}
    assert _imported("ropekit.m", source, known, type_only=True) == {"ropekit.config"}
    # A function-level import counts: commands.common imports ropekit.hf inside functions only.
    assert "ropekit.hf" in graph["ropekit.commands.common"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _layer("ropekit") == _layer("ropekit.module") and _layer("ropekit.newthing") is None
    assert _layer("ropekit.kernels.dispatch") > _layer("ropekit.kernels.cpu") > _layer("ropekit.rotation")


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycles_counting_type_only_imports():
    """A circle closed by an ``if TYPE_CHECKING:`` import is still a circle (the modules cannot be split or
    moved one without the other); the run-time cycles are reported by the test above."""
    typed = _type_only_graph()
    cycles = _cycles(_full_graph())
    assert not cycles, "import cycles (type-only edges marked 'type:'):\n" + "\n".join(
        " -> ".join([c[0]] + [f"type:{b}" if b in typed[a] else b for a, b in zip(c, c[1:])]) for c in cycles)


def test_layers_name_only_modules_that_exist():
    modules = _modules()
    stale = sorted(name for _, names in LAYERS for name in names if name.lstrip("=") not in modules)
    assert not stale, f"LAYERS names modules that do not exist (remove or rename them): {stale}"


def test_the_library_never_imports_the_cli():
    graph = _graph()
    bad = sorted(f"{m} -> {dep}" for m, deps in graph.items() if not m.startswith(CLI_PREFIXES)
                 for dep in deps if dep.startswith(CLI_PREFIXES))
    assert not bad, "library modules importing the CLI:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if _layer(m) is None)
    assert not missing, f"modules with no layer in LAYERS (add them): {missing}"


def test_layers_import_only_downwards():
    graph = _graph()
    bad = []
    for module, deps in sorted(graph.items()):
        here = _layer(module)
        for dep in sorted(deps):
            there = _layer(dep)
            if here is not None and there is not None and there > here:
                bad.append(f"{module} ({LAYERS[here][0]}) -> {dep} ({LAYERS[there][0]})")
    assert not bad, "imports going up a layer:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["ropekit.rotation", "ropekit.config", "ropekit.methods.registry"])
def test_the_reference_and_core_import_no_kernels(module):
    deps = _graph()[module]
    assert not any(d.startswith("ropekit.kernels") for d in deps), deps


MAX_LINES = 500
LONG_FILE_REASON = "Over 500 lines because"


def _too_long() -> dict[str, int]:
    """Modules over MAX_LINES lines whose docstring does not say why (a line "Over 500 lines because ...")."""
    found = {}
    for name, path in _modules().items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_LINES and LONG_FILE_REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            found[name] = lines
    return found


def test_the_size_check_reads_the_docstring(tmp_path):
    long = "x = 1\n" * (MAX_LINES + 1)
    assert LONG_FILE_REASON not in (ast.get_docstring(ast.parse(long)) or "")
    explained = f'"""A long table.\n\n{LONG_FILE_REASON} it is one table."""\n' + long
    assert LONG_FILE_REASON in ast.get_docstring(ast.parse(explained))


def test_no_source_file_over_500_lines_without_a_reason():
    long = _too_long()
    assert not long, (f"modules over {MAX_LINES} lines whose docstring does not say why ('{LONG_FILE_REASON} ...'; "
                      "better: split them by concern): " + ", ".join(f"{m} ({n})" for m, n in sorted(long.items())))
