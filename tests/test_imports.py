"""Imports flow one way, as DESIGN.md's layer list draws them: read from the source (ast), not by importing.

A module may import its own layer and the layers below (functions' imports included); no two modules
import each other at module level; nothing outside fastdit/ops imports its private modules.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fastdit"


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name):
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def imports(path):
    """{(imported fastdit module, at module level?)} of the file at `path`."""
    name, is_package = module_name(path), path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                parent = here[: len(here) - child.level + 1] if child.level else []
                base = ".".join(parent + ([child.module] if child.module else []))
                for a in child.names:  # `from . import ops` imports the module fastdit.ops
                    found.add((f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base, top))
            else:
                visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), True)
    return {(m, top) for m, top in found if m.split(".")[0] == "fastdit" and m != name}


@pytest.fixture(scope="module")
def graph():
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def design_layers():
    """DESIGN.md's layer list, top first: a list of sets of module names (`ops/`: the package)."""
    block = re.search(r"## Layers.*?```\n(.*?)```", (REPO / "DESIGN.md").read_text(), re.S).group(1)
    layers = []
    for line in block.splitlines():
        names = re.findall(r"([\w]+)(?:\.py|/)", re.split(r"\s{2,}", line.strip())[0])
        if line.startswith(" "):
            layers[-1].update(names)
        else:
            layers.append(set(names))
    return [{f"fastdit.{n}" for n in layer} for layer in layers]


def layer_of(module, layers):
    if module == "fastdit":
        return 0  # the package's __init__ (the API) imports the layers it exports: the top, beside the command
    for i, layer in enumerate(layers):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return None


def test_every_module_has_a_layer_in_design_md(graph):
    layers = design_layers()
    missing = [m for m in graph if layer_of(m, layers) is None]
    assert not missing, f"DESIGN.md's layer list does not place {missing}"


def test_imports_point_down_the_layers(graph):
    layers = design_layers()
    upward = [
        f"{m} ({'module' if top else 'function'} level) imports {t}"
        for m, edges in graph.items()
        for t, top in sorted(edges)
        if (layer_of(t, layers) or 0) < (layer_of(m, layers) or 0)  # an unplaced module: the test above
    ]
    assert not upward, "imports against DESIGN.md's layers:\n" + "\n".join(upward)


def test_no_import_cycle_at_module_level(graph):
    edges = {m: {t for t, top in e if top and t in graph} for m, e in graph.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t) :] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_private_ops_modules_stay_inside_ops(graph):
    leaks = [
        f"{m} imports {t}"
        for m, edges in graph.items()
        if not m.startswith("fastdit.ops")
        for t, _ in edges
        if t.startswith("fastdit.ops._")
    ]
    assert not leaks, "use fastdit.ops's public names:\n" + "\n".join(leaks)


def test_the_oracle_and_diffusion_stand_apart(graph):
    for m in ("fastdit.reference", "fastdit.reference_model"):
        assert not graph[m], f"{m} is the oracle and imports nothing from fastdit, yet imports {graph[m]}"
    for m, edges in graph.items():
        if m.startswith("fastdit.diffusion"):
            assert not [t for t, _ in edges if t.startswith("fastdit.ops")], f"{m} imports fastdit.ops"
