"""The package's shape: who may import whom, no import cycles, and an import that changes nothing.

The import graph is read from the source with `ast` (every `import` / `from ... import`, also
those inside functions), so it covers lazy imports that a runtime check would miss.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "swinkit"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/swinkit (a package is its __init__.py)."""
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, dict[str, int]]:
    """{importer: {imported module: line}} over swinkit's own modules.

    `from pkg import name` points at `pkg.name` when that is a module, else at `pkg`. Importing
    a module also runs its parent packages' `__init__`, so those count too, except the
    importer's own parents (they are already being imported when it runs).
    """
    modules = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: dict[str, int] = {}

        def add(target: str, line: int, explicit: bool = True) -> None:
            while target not in modules:  # `import swinkit.x.attr` style: the nearest module
                target = target.rpartition(".")[0]
            own_parents = _ancestors(name)
            if explicit or target not in own_parents:
                targets.setdefault(target, line)
            for parent in _ancestors(target):
                if parent not in own_parents and parent != name:
                    targets.setdefault(parent, line)

        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base != PACKAGE and not base.startswith(PACKAGE + "."):
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    add(submodule if submodule in modules else base, node.lineno)
        targets.pop(name, None)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = package_modules()
    steps = [f"{a} ({modules[a].relative_to(SOURCE.parent)}:{graph[a][b]}) imports {b}"
             for a, b in zip(cycle, cycle[1:])]
    return "import cycle:\n  " + "\n  ".join(steps)


def test_import_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "swinkit.api" in graph["swinkit"]                          # from .api import ... (package __init__)
    assert "swinkit.models.registry" in graph["swinkit.api"]          # from .models.registry import ...
    assert "swinkit.models" in graph["swinkit.api"]                   # ... which runs models/__init__.py first
    assert "swinkit.infer.onnx_runner" in graph["swinkit.infer.runner"]  # inside load_runner
    assert "swinkit.train.cli" in graph["swinkit.cli"]                # inside _extra_commands


def test_find_cycle_names_the_loop():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_train_never_imports_infer():
    graph = import_graph()
    modules = package_modules()
    offenders = [f"{name} ({modules[name].relative_to(SOURCE.parent)}:{line}) imports {target}"
                 for name, targets in graph.items() if name == "swinkit.train" or name.startswith("swinkit.train.")
                 for target, line in targets.items()
                 if target == "swinkit.infer" or target.startswith("swinkit.infer.")]
    assert not offenders, "training must not depend on inference:\n  " + "\n  ".join(offenders)


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, describe(cycle, graph)


def _python(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=env if env is not None else os.environ.copy())
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_leaves_the_environment_alone():
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    printed = _python("import os, swinkit; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))", env)
    assert printed == "None"


def test_import_does_not_load_training():
    """Training is loaded by whoever trains, never by `import swinkit` (the allocator module is loaded, by the
    fast path, but only its callers change malloc settings: the next test spies on them)."""
    printed = _python("import sys, swinkit; print(sorted(m for m in sys.modules if m.startswith('swinkit.train')))")
    assert printed == "[]", f"`import swinkit` loaded {printed} (it must not load training)"


def test_importing_any_part_of_swinkit_leaves_malloc_settings_alone():
    """Even the training modules only define the allocator policy; entering it is the trainer's choice."""
    code = """
import ctypes
calls = []
class Spy(ctypes.CDLL):
    def __getattr__(self, name):
        if name in ("mallopt", "malloc_trim"):
            calls.append(name)
        return super().__getattr__(name)
ctypes.CDLL = Spy
import swinkit, swinkit.cli, swinkit.train.trainer, swinkit.train.memory, swinkit.bench.train
from swinkit import allocator
print(calls, allocator.free_memory_returned())
"""
    assert _python(code) == "[] False"


def test_the_training_memory_scope_is_undone_on_leaving():
    code = """
from swinkit import allocator
with allocator.returning_freed_memory():
    inside = allocator.free_memory_returned()
print(inside, allocator.free_memory_returned())
"""
    printed = _python(code)
    assert printed in ("True False", "False False")  # False False: not glibc, nothing to change
