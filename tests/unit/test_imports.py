"""Imports run one way: no import cycle inside ``flowrl/`` or ``callbacks/`` (function-level imports included), and
``callbacks/`` imports nothing from flowrl."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _modules() -> dict[str, str]:
    found = {}
    for package in ("flowrl", "callbacks"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (a package's own parts left out: a package
    re-exporting its submodules is not a cycle)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
        resolved = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not target.startswith(name + "."):
                resolved.add(target)
        graph[name] = resolved
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_flowrl_or_callbacks():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_callbacks_import_nothing_from_flowrl():
    graph = import_graph()
    leaks = {m: sorted(t for t in targets if t.startswith("flowrl")) for m, targets in graph.items()
             if m.startswith("callbacks")}
    assert not any(leaks.values()), leaks


def test_the_core_never_imports_the_toy():
    """The toy world registers its model alias, prompt sets and reward itself (a ``flowrl.plugins`` entry point)."""
    graph = import_graph()
    naming = {m: sorted(t for t in targets if t.startswith("flowrl.toy"))
              for m, targets in graph.items() if not m.startswith("flowrl.toy")}
    assert not any(naming.values()), naming


def test_the_toy_plugin_is_found_through_its_entry_point():
    from flowrl.data import load_prompts
    from flowrl.plugins import model_alias
    from flowrl.rewards import available_rewards

    assert model_alias("flowrl:toy").endswith("checkpoint") and "shapes" in available_rewards()
    assert len(load_prompts("toy:eval")) == 160 and model_alias("stabilityai/stable-diffusion-3.5-medium") is None
