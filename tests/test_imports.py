"""The import graph of the whole package, read with `ast` (imports inside functions included, since hiding an
import in a function hides a cycle, it does not break it): no cycles, and imports point one way, library <-
components <- pipelines, with the stages below the runtime that runs them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject's package-dir), and the layers: a module imports its own layer or
# the ones below
PACKAGES = {"blueprint": "blueprint", "components": "blueprint.components", "pipelines": "blueprint.pipelines"}
LAYERS = {"blueprint.components": 1, "blueprint.pipelines": 2}  # the rest of blueprint: 0


def layer(module: str) -> int:
    return next((n for prefix, n in LAYERS.items() if module == prefix or module.startswith(prefix + ".")), 0)


def module_files(root: Path = REPO) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its __init__)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            found[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return found


def imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules that `tree` imports anywhere in its body: `from a import b` is `a.b` when that is a
    module, else `a` itself."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
    return found & modules


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imported(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when it has none (depth-first, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return []


def test_the_cycle_finder_names_a_cycle_hidden_in_a_function_and_passes_a_chain(tmp_path):
    (tmp_path / "blueprint").mkdir()
    (tmp_path / "blueprint" / "a.py").write_text("from blueprint import b\n")
    (tmp_path / "blueprint" / "b.py").write_text("def f():\n    from blueprint.a import x\n")
    assert find_cycle(import_graph(tmp_path)) == ["blueprint.a", "blueprint.b", "blueprint.a"]
    (tmp_path / "blueprint" / "b.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path)) == []


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_imports_point_one_way_library_components_pipelines():
    upward = [
        f"{name} imports {other}"
        for name, others in import_graph().items()
        for other in sorted(others)
        if layer(other) > layer(name)
    ]
    assert upward == []


def test_the_stages_never_import_the_runtime_that_runs_them():
    found = [
        f"{name} imports {other}"
        for name, others in import_graph().items()
        for other in sorted(others)
        if name.startswith("blueprint.stages") and other.startswith("blueprint.runtime")
    ]
    assert found == []


def test_planning_a_run_and_reading_every_stage_config_leave_torch_unimported(tmp_path):
    """`blueprint run`'s plan, `compile` and `--help` read the stages' configs: seconds of torch import each time,
    and a pod without torch (the CLI alone) could not plan at all."""
    program = (
        "import sys\n"
        "from blueprint.pipelines import local_run\n"
        "from blueprint.stages import registry\n"
        "for spec in registry.STAGES.values():\n"
        "    spec.config_type()\n"
        f"local_run.plan('smoke', artifact_root={str(tmp_path)!r})\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
