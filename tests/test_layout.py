"""Imports run one way: pipeline -> artifact -> core -> io, with no cycle, counting imports inside functions."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vdistill"

# The layer of every module, by the longest matching prefix; a module imports only its own layer or lower ones.
LAYERS = {
    "vdistill.storage": 0, "vdistill.redact": 0, "vdistill.errors": 0, "vdistill.lease": 0,
    "vdistill.checkpoint": 0, "vdistill.config": 0, "vdistill.data": 0,
    "vdistill.models": 1, "vdistill.train": 1, "vdistill.augment": 1, "vdistill.device": 1, "vdistill.render": 1,
    "vdistill.distill": 1, "vdistill.evaluate": 1, "vdistill.coreset": 1, "vdistill.experts": 1,
    "vdistill.export": 2,
    "vdistill.tracking": 3, "vdistill.stage": 3, "vdistill.stages": 3, "vdistill.pipeline": 3,
    "vdistill.coordinator": 3, "vdistill.cli": 3, "vdistill": 3,
}
NAMES = ("io", "core", "artifact", "pipeline")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every vdistill module each module imports, anywhere in its body (`from a import b` counts a.b if a module)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vdistill":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "vdistill"}
        graph[name] = found - {name}
    return graph


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    graph = _imports(_modules())
    upward = [f"{m} ({NAMES[_layer(m)]}) imports {d} ({NAMES[_layer(d)]})"
              for m, deps in sorted(graph.items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert upward == []


def test_no_two_modules_import_each_other_directly_or_through_a_cycle():
    graph = _imports(_modules())
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_reading_the_clip_cache_does_not_import_pyav():
    code = "import sys, vdistill.data.clips, vdistill.experts, vdistill.evaluate; print('av' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
