"""The house's import graph: no cycles, and no import from a lower layer up.

The graph is read from the source (``ast``), not by importing: every ``import`` and ``from ...
import`` of ``dchag`` and ``megatron_patches``, at module level and inside functions (a
function-level import is still a dependency, only a later one). ``from pkg import name`` counts
as an import of ``pkg.name`` when that is a module, else of ``pkg``.

The layers, lowest first (a module belongs to the longest prefix listed; a module may import its
own layer and the layers below it):

1.  ``dchag.device``, ``dchag.help_text``       which device and backend a run uses; help text
2.  ``dchag.parallel``                         channel partition, layouts, collectives
3.  ``megatron_patches``                       small, version-guarded patches to megatron-core
4.  ``dchag.model``                            the model (shapes, not process groups)
5.  ``dchag.data``                             readers, tiles, datasets, data order
6.  ``dchag.tasks``                            objectives: heads' losses, masks, metrics
7.  ``dchag.arguments``                        the command line
8.  ``dchag.inference.runtime``                the one-process layout a serial model is built in
9.  ``dchag.checkpointing``                    save, load, check, convert, export
10. ``dchag.transfer``                         fine-tuning: a pretrained model's weights onto a new model
11. ``dchag.planner``                          memory / communication / FLOPs arithmetic (the pre-flight's
                                               memory check asks it)
12. ``dchag.training``                         pre-flight, process groups, the loop
13. ``dchag.inference``                        a trained model in one process; prediction
14. ``dchag.bench``                            benchmarks of the real code
15. ``dchag.sim``                              the real code at cluster scale on fake tensors, beside the planner
16. ``dchag.parity``                           studies of whole training runs: parity, transfer
17. ``dchag`` (its ``__init__``)               the public facade (``dchag.load_pretrained``)
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dchag", "megatron_patches")

LAYERS = [
    ("dchag.device", "dchag.help_text"),
    ("dchag.parallel",),
    ("megatron_patches",),
    ("dchag.model",),
    ("dchag.data",),
    ("dchag.tasks",),
    ("dchag.arguments",),
    ("dchag.inference.runtime",),
    ("dchag.checkpointing",),
    ("dchag.transfer",),
    ("dchag.planner",),
    ("dchag.training",),
    ("dchag.inference",),
    ("dchag.bench",),
    ("dchag.sim",),
    ("dchag.parity",),
    ("dchag",),
]

def modules(root: str, packages=PACKAGES) -> dict[str, str]:
    """dotted module name -> file, for every .py file of ``packages`` under ``root``."""
    out = {}
    for pkg in packages:
        for folder, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph(root: str, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the house's modules it imports (anywhere in its file)."""
    mods = modules(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = defaultdict(set)
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y / from .. import z
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != mod:
                    graph[mod].add(found)
    for mod in mods:
        graph.setdefault(mod, set())
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, best_len = None, -1
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if layer_of(a, layers) < layer_of(b, layers))


def test_the_house_has_no_cycles_and_no_upward_imports():
    graph = import_graph(REPO)
    assert len(graph) > 100, sorted(graph)  # the walk found the house
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules outside every layer (add them to LAYERS and the docstring): {unplaced}"
    assert not cycles(graph), f"import cycles: {cycles(graph)}"
    up = upward_imports(graph)
    assert not up, "imports from a lower layer up:\n" + "\n".join(f"  {a} ({layer_of(a) + 1}) -> {b} ({layer_of(b) + 1})"
                                                                   for a, b in up)


def test_the_checks_see_cycles_function_level_imports_and_upward_imports(tmp_path):
    """The same checks on a small house written here: a cycle through a function-level relative
    import, and an import from the low layer up."""
    pkg = tmp_path / "house"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    for init in (pkg, pkg / "low", pkg / "high"):
        (init / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from house.low import b\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from . import a\n    from ..high.c import g\n")
    (pkg / "high" / "c.py").write_text("import os\nimport house.high as h\n\ndef g():\n    pass\n")
    graph = import_graph(str(tmp_path), ("house",))
    assert graph["house.low.b"] == {"house.low.a", "house.high.c"} and graph["house.high.c"] == {"house.high"}
    assert cycles(graph) == [["house.low.a", "house.low.b"]]
    layers = [("house.low",), ("house.high", "house")]
    assert upward_imports(graph, layers) == [("house.low.b", "house.high.c")]
