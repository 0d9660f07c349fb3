"""The package's shape: the layers (library, data, I/O, benchmarks, applications) import only downwards, no import
cycle among the timm_dec modules, no ``import timm_dec`` inside the package, no module outside a package importing
that package's ``_private`` modules, no module over 700 lines and no function over 80 lines (tests aside).

Every import counts, function-local ones too: deferring an import hides an edge from a reader, not from the layering.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "timm_dec"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if _is_package(importer) else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imported(importer: str, node: ast.AST) -> Iterator[str]:
    """The timm_dec modules an import statement loads (a package's ``__init__`` for each package on the way)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = _resolve(importer, node.level, node.module)
        targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    for target in targets:
        if target in MODULES and target != importer:
            yield target


def _all_imports(tree: ast.Module) -> Iterator[ast.AST]:
    """Every import statement of a module: module-level ones and those inside functions and classes."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {t for node in _all_imports(tree) for t in _imported(name, node)}
        # a submodule's import first imports its parent packages, which is no edge of this module's own
        graph[name] -= {p for p in graph[name] if name.startswith(p + ".")}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` as a list of modules (first == last), or [] when there is none."""
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_among_timm_dec_modules():
    graph = import_graph()
    assert graph["timm_dec"] and graph["timm_dec.models"], "the graph must see the package's own imports"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_import_of_timm_dec_inside_the_package():
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "timm_dec" for a in node.names):
                offenders.append(f"{name}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("timm_dec"):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"absolute imports of timm_dec inside the package (use relative imports): {offenders}"


def private_owner(module: str) -> str | None:
    """The package that ``module`` is private to (``timm_dec.models`` for ``timm_dec.models._base``; ``timm_dec`` for
    ``timm_dec._format``), or None for a public module: the package above its first ``_name`` part."""
    parts = module.split(".")
    for index in range(1, len(parts)):
        if parts[index].startswith("_"):
            return ".".join(parts[:index])
    return None


def private_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """The edges of ``graph`` from a module outside a package P into a ``_private`` module of P."""
    return [f"{name} -> {target}" for name, targets in sorted(graph.items()) for target in sorted(targets)
            if (owner := private_owner(target)) is not None and name != owner and not name.startswith(owner + ".")]


def test_the_private_import_check_sees_a_reach_into_another_package():
    graph = {"timm_dec.apps.demo": {"timm_dec.models._base", "timm_dec.models", "timm_dec._format"},
             "timm_dec.models.vit_dec": {"timm_dec.models._base"}, "timm_dec.models": {"timm_dec.models._registry"},
             "timm_dec.data.digits": {"timm_dec.ops.random"}, "timm_dec.apps._common": {"timm_dec.apps._start"}}
    assert private_imports(graph) == ["timm_dec.apps.demo -> timm_dec.models._base"]
    tree = ast.parse("def f():\n    from ..models import _base\n")
    assert [n for node in _all_imports(tree) for n in _imported("timm_dec.apps.demo", node)] == [
        "timm_dec.models", "timm_dec.models._base"]


def test_no_module_imports_the_private_modules_of_another_package():
    """Other layers import a package's public names (its ``__init__``), never its ``_private`` modules; a top-level
    ``timm_dec._name`` module is private to ``timm_dec`` and open to every module in it."""
    offenders = private_imports(import_graph())
    assert not offenders, "imports of another package's private modules (import its public names instead):\n" + (
        "\n".join(offenders))


def private_names(name: str, tree: ast.Module) -> List[str]:
    """The ``_private`` names that module ``name`` imports (``from M import _x``) from a module M of a package it is
    not in: a ``_name`` of a module of package P is private to P, as a ``_module`` of P is."""
    found = []
    for node in _all_imports(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = _resolve(name, node.level, node.module)
        if source not in MODULES:
            continue
        owner = source if _is_package(source) else source.rpartition(".")[0]
        if name == owner or name.startswith(owner + "."):
            continue
        found += [f"{name} -> {source}.{alias.name}" for alias in node.names if alias.name.startswith("_")
                  and not alias.name.startswith("__") and f"{source}.{alias.name}" not in MODULES]
    return found


def test_the_private_name_check_sees_a_reach_into_another_package():
    tree = ast.parse("from .ops.random import _check_int, random_knots\nfrom . import __version__\n"
                     "from .checkpoint import _read_json\n")
    assert private_names("timm_dec.metrics", tree) == ["timm_dec.metrics -> timm_dec.ops.random._check_int"]
    assert private_names("timm_dec.ops.warp", tree) == []  # inside timm_dec.ops (and timm_dec)


def test_no_module_imports_the_private_names_of_another_package():
    offenders = [edge for name, path in MODULES.items()
                 for edge in private_names(name, ast.parse(path.read_text(encoding="utf-8")))]
    assert not offenders, "imports of another package's private names (make them public or move them):\n" + (
        "\n".join(offenders))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_MODULE_LINES})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_function_size(name: str):
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{MODULES[name]}: functions over {MAX_FUNCTION_LINES} lines: {long}"


# The layers, lowest first (README "Design", /work/shared/DESIGN.md "Layout"): a module may import its own layer and
# those below it. `_compat`, `_format` and `_argcheck` (the shared argument checks) are leaves that every layer
# may use.
LAYERS = (
    ("library", ("timm_dec._compat", "timm_dec._format", "timm_dec._argcheck", "timm_dec.ops", "timm_dec.solver",
                 "timm_dec.dec", "timm_dec.models", "timm_dec.adapt", "timm_dec")),
    ("data", ("timm_dec.data", "timm_dec.metrics", "timm_dec.baselines")),
    ("io", ("timm_dec.checkpoint", "timm_dec.hub")),
    ("bench", ("timm_dec.bench",)),
    ("apps", ("timm_dec.apps", "timm_dec.finetune", "timm_dec.cli")),
)


def layer_of(module: str) -> int:
    """The index in `LAYERS` of the layer that holds ``module`` (the longest matching prefix)."""
    best, level = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level >= 0, f"{module} is in no layer of tests/test_layout.py LAYERS: add it"
    return level


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)


def test_layers_import_only_downwards():
    """The library never imports data, I/O, benchmarks or apps; I/O never the apps; and so on (every import)."""
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in sorted(import_graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_the_layer_check_sees_function_local_imports():
    tree = ast.parse("def f():\n    from .. import hub\n")
    imported = [n for node in _all_imports(tree) for n in _imported("timm_dec.apps.evaluate", node)]
    assert imported == ["timm_dec", "timm_dec.hub"]


# The one function that writes safetensors files (issue 23): every saved model goes through it.
SAFETENSORS_WRITER = ("timm_dec.checkpoint", "write_safetensors")


def save_file_calls(name: str, tree: ast.Module, callee: str = "save_file") -> List[str]:
    """The calls to ``callee`` (default ``save_file``: ``safetensors.torch.save_file``, however imported) in module
    ``name``, each as ``module:function:line`` (``<module>`` outside any function)."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Call):
                func = child.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == callee:
                    found.append(f"{name}:{function}:{child.lineno}")
            visit(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)

    visit(tree, "<module>")
    return found


def test_the_save_file_check_sees_every_kind_of_call():
    tree = ast.parse("import safetensors.torch\nfrom safetensors.torch import save_file\n"
                     "def f(t):\n    safetensors.torch.save_file(t, 'a')\n"
                     "def g(t):\n    save_file(t, 'b')\n    x = [save_file]\n")
    assert save_file_calls("timm_dec.m", tree) == ["timm_dec.m:f:4", "timm_dec.m:g:6"]


def test_one_function_writes_safetensors():
    """``grep save_file timm_dec/`` finds one call: `timm_dec.checkpoint.write_safetensors`, which every saved model
    (the demo's and the segmenter's checkpoints, the shared starts) goes through."""
    calls = [c for name, path in MODULES.items() for c in save_file_calls(name, ast.parse(path.read_text("utf-8")))]
    module, function = SAFETENSORS_WRITER
    assert len(calls) == 1 and calls[0].startswith(f"{module}:{function}:"), (
        f"safetensors files must be written only by {module}.{function} (one save_file call); found: {calls}")


# The one writer of saved models (issue 23): `write_safetensors` is called by `save_model` (a model with its record)
# and by the shared starts (plain state dicts, hash-checked), by nothing else.
SAVED_MODEL_WRITERS = ("timm_dec.checkpoint:save_model", "timm_dec.apps._start:write_start")


def test_one_function_writes_saved_models():
    """Every saved model (demo, segment and finetune checkpoints, save_pretrained folders) goes through
    `timm_dec.checkpoint.save_model`, which writes the one record; only the shared starts write weights without it."""
    calls = [c for name, path in MODULES.items()
             for c in save_file_calls(name, ast.parse(path.read_text("utf-8")), "write_safetensors")]
    callers = sorted({c.rsplit(":", 1)[0] for c in calls})
    assert callers == sorted(SAVED_MODEL_WRITERS), (
        f"write_safetensors must be called only by {SAVED_MODEL_WRITERS} (save models with save_model); found: {calls}")
