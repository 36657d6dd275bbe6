"""The package layout holds: no import cycles (function-local imports included), only bindweave/app
(and the benchmarks in bindweave/testing, which compose the parts as the app does) imports parallel/, and the runtime packages never import test support (bindweave/testing), except
the built-in tiny model set that `model=tiny` / `qwen=tiny` name as their weights."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bindweave", "parallel")
RUNTIME = ("bindweave.model", "bindweave.io", "bindweave.encoders", "bindweave.sampling", "bindweave.stages",
           "bindweave.settings")
TINY_WEIGHTS = "bindweave.testing.tiny"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports, at any depth (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` names a module; `from module import name` the module.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_what_it_looks_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = project_modules()
    assert "bindweave.stages.engine" in modules and "parallel.runtime" in modules
    # A function-local import counts: app/generate.py imports parallel.distributed inside a method.
    assert "parallel.distributed" in import_graph()["bindweave.app.generate"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_only_the_app_imports_parallel():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "parallel")
                 for name, targets in import_graph().items()
                 if name.startswith("bindweave") and not name.startswith(("bindweave.app", "bindweave.testing"))}
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_runtime_packages_import_no_test_support():
    offenders = {name: sorted(t for t in targets if t.startswith("bindweave.testing") and t != TINY_WEIGHTS)
                 for name, targets in import_graph().items() if name.startswith(RUNTIME)}
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_the_model_files_import_no_loader_and_no_io():
    for name in ("bindweave.model.transformer", "bindweave.model.attention", "bindweave.model.speed"):
        assert not {t for t in import_graph()[name] if t.startswith(("bindweave.io", "bindweave.testing",
                                                                    "bindweave.model.loading"))}, name


def test_parallel_never_imports_the_stages_or_the_app():
    offenders = {name: sorted(t for t in targets if t.startswith(("bindweave.app", "bindweave.stages")))
                 for name, targets in import_graph().items() if name.startswith("parallel")}
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_the_settings_import_only_the_errors_and_the_kernels_registry():
    graph = import_graph()
    settings = [name for name in graph if name.startswith("bindweave.settings")]
    assert "bindweave.settings.model" in settings
    # One settings group may hold another's dataclass (model.loras: bindweave.settings.lora); the
    # kernel choices come from the registry, which imports no torch at import time (nor anything else).
    allowed = {"bindweave.errors", "bindweave.model.kernels"}
    assert {name: sorted(t for t in graph[name] if not t.startswith("bindweave.settings") and t not in allowed)
            for name in settings} == {name: [] for name in settings}
    assert "bindweave.errors" in graph["bindweave.settings.model"]
    assert graph["bindweave.model.kernels"] == set()


def test_a_wrong_command_line_is_refused_without_importing_torch_or_the_model_libraries():
    """What ``python launch/generate.py model.attention_kernal=x`` runs before its error (and every
    entry point's schema: serve's too), in a fresh interpreter."""
    import subprocess
    import sys

    code = """
import sys
from bindweave.app.config import check_command_line, register_schemas
from bindweave.errors import BindWeaveInputError
register_schemas()
for name in ("generate", "extract", "refine", "calibrate", "serve"):
    try:
        check_command_line(name, ["model.attention_kernal=x", "qwen.dtyp=x"])
    except BindWeaveInputError as error:
        print(name, "refused:", str(error)[:40])
print("loaded:", sorted(m for m in ("torch", "diffusers", "transformers", "PIL") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("refused: unknown setting") == 5, result.stdout
    assert result.stdout.strip().endswith("loaded: []"), result.stdout
