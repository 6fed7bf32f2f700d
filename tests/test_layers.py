"""The package layering points one way and no project module imports another inside a function.

Layers, bottom to top: text → attention → model → sharding → convert → evals → train. A
package may import only packages below it. The walk covers every import statement, including
those inside functions, so a lazy import cannot hide a cycle.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("text", "attention", "model", "sharding", "convert", "evals", "train")


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict[str, pathlib.Path]):
    """``(target module, line, inside a function)`` for every project import in the file."""
    tree = ast.parse(path.read_text())
    inner = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for node in ast.walk(fn)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            # `from pkg import sub` imports the submodule; `from pkg import name` the package's __init__.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for target in targets:
            if target in mods and target != name:
                yield target, node.lineno, id(node) in inner


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return mods, {name: list(_imports(name, path, mods)) for name, path in mods.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_cycle_between_files(graph):
    _, imports = graph
    edges = {m: {t for t, _, _ in found} for m, found in imports.items()}
    assert _cycles(edges) == []


def test_packages_import_only_lower_layers(graph):
    _, imports = graph
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    upward = [
        f"{m}:{line} imports {t}"
        for m, found in imports.items()
        for t, line, _ in found
        if rank[t.split(".")[0]] > rank[m.split(".")[0]]
    ]
    assert upward == []
    edges = {}
    for m, found in imports.items():
        for t, _, _ in found:
            if t.split(".")[0] != m.split(".")[0]:
                edges.setdefault(m.split(".")[0], set()).add(t.split(".")[0])
    assert _cycles(edges) == []


def test_project_imports_sit_at_module_top(graph):
    _, imports = graph
    inside = [f"{m}:{line} imports {t}" for m, found in imports.items() for t, line, inner in found if inner]
    assert inside == []


def test_the_walk_sees_lazy_imports(tmp_path):
    """The checker itself: a function-level import of a higher layer is found (so the tests above can fail)."""
    src = "def f():\n    from train import curriculum\n"
    path = tmp_path / "probe.py"
    path.write_text(src)
    mods = {"model.probe": path, "train.curriculum": path, "train": path}
    found = list(_imports("model.probe", path, mods))
    assert found == [("train.curriculum", 2, True)]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
